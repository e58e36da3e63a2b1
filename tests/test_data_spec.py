"""The standard class splits shipped as package data: counts, disjointness, consistency."""

import collections

import pytest

from metadiff_jax.data import spec

COUNTS = {"mini_imagenet": (64, 16, 20), "tiered_imagenet": (351, 97, 160),
          "cifar_fs": (64, 16, 20), "fc100": (60, 20, 20)}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_class_counts_and_disjoint_splits(name):
  s = spec.standard_spec(name)
  assert tuple(s.num_classes(split) for split in spec.SPLITS) == COUNTS[name]
  everything = [c for split in spec.SPLITS for c in s.classes[split]]
  assert len(everything) == len(set(everything))  # no class twice, within or across splits


def test_mini_imagenet_csvs_name_600_images_of_each_listed_class():
  for split in spec.SPLITS:
    rows = spec.mini_imagenet_filenames(split)
    counts = collections.Counter(wnid for _, wnid in rows)
    assert set(counts) == set(spec.mini_imagenet_wnids(split))
    assert set(counts.values()) == {600}
    assert all(f.startswith(w) and f.endswith(".jpg") and len(f) == 21 for f, w in rows)


def test_tiered_imagenet_categories_are_disjoint():
  categories = {split: {c for c, _ in spec.tiered_imagenet_classes(split)}
                for split in spec.SPLITS}
  assert [len(categories[s]) for s in spec.SPLITS] == [20, 6, 8]
  assert not categories["train"] & categories["val"]
  assert not categories["train"] & categories["test"]
  assert not categories["val"] & categories["test"]


def test_fc100_and_cifar_fs_cover_cifar_100():
  fine = spec.cifar100_fine_names()
  assert len(fine) == 100 and fine[0] == "apple" and fine[-1] == "worm"
  fc100_fine = {c for s in spec.SPLITS for _, c in spec.fc100_classes(s)}
  assert fc100_fine == set(fine)
  coarse = spec.cifar100_coarse_names()
  assert len(coarse) == 20 and coarse[0] == "aquatic_mammals" and coarse[-1] == "vehicles_2"
  per_super = collections.Counter(sup for s in spec.SPLITS for sup, _ in spec.fc100_classes(s))
  assert set(per_super.values()) == {5}
  supers = {s: {sup for sup, _ in spec.fc100_classes(s)} for s in spec.SPLITS}
  assert [len(supers[s]) for s in spec.SPLITS] == [12, 4, 4]
  # TADAM's split in coarse-label indices (ElementAI/TADAM create_dataset_cifar100.py).
  assert {coarse.index(x) for x in supers["val"]} == {8, 11, 13, 16}
  assert {coarse.index(x) for x in supers["test"]} == {0, 7, 12, 14}


def test_subset_keeps_the_first_classes():
  s = spec.standard_spec("cifar_fs").subset({"train": 3, "val": 2, "test": 1}, 5)
  assert s.classes["train"] == spec.cifar_fs_classes("train")[:3]
  assert s.images_per_class == 5 and s.num_classes("test") == 1
  with pytest.raises(ValueError, match="no standard spec"):
    spec.standard_spec("omniglot")
  with pytest.raises(ValueError, match="split must be one of"):
    spec.cifar_fs_classes("validation")
