"""Few-shot data (docs/DATASETS.md).

- `builders`: TFDS builders writing array_record files without TensorFlow; `formats` (a package,
  one module per family of on-disk formats) reads the users' files, `embedded` generates the
  sets that need no download (`glyphs`, `textures`), `spec` holds the standard splits.
- `load`: opens a built dataset; whole splits as `SplitArrays`, or only their labels.
- `episodes`: the episode sampler, a pure function of (seed, split, episode index).
- `features`: the feature cache of a split under a frozen backbone, and episode gathering.
- `augment`: on-device augmentation for backbone pretraining.

`python -m metadiff_jax.data build <name>` and `inspect <name>` are the command line.
Submodules are imported on use, so `import metadiff_jax.data.episodes` stays light.
"""
