"""The launch scripts (launch/*.sh): their dry runs, options, and failure handling.

Nothing here starts JAX or reaches a cloud: `--dry-run` prints the commands, and the few
tests that run a script for real put fake `gcloud`, `sbatch` or `python` executables first
on PATH (or in $PYTHON) that only record what they were asked to do.
"""

import os
import re
import shutil
import stat
import subprocess

import pytest

from conftest import REPO

LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_pod.sh", "slurm_gpu.sh", "local.sh")
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def run(script, *args, env=None, path_first=None, timeout=30):
  """Runs launch/<script> with a clean environment plus `env`; returns the CompletedProcess."""
  path = os.environ.get("PATH", "/usr/bin:/bin")
  if path_first is not None:
    path = f"{path_first}{os.pathsep}{path}"
  full_env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C"}
  full_env.update(env or {})
  return subprocess.run([BASH, str(LAUNCH / script), *args], env=full_env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def commands(stdout):
  """The lines a dry run printed as commands ('+ ' stripped)."""
  return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def write_executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
  result = subprocess.run([BASH, "-n", str(LAUNCH / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_with_usage(script):
  result = run(script, "--help")
  assert result.returncode == 0, result.stderr
  assert "Usage:" in result.stdout and f"launch/{script}" in result.stdout
  assert "--dry-run" in result.stdout
  assert not result.stdout.startswith("!")  # the shebang is not part of the help


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_option_fails_with_one_line(script):
  result = run(script, "--no-such-option", env={"BUCKET": "b", "DRY_RUN": "1"})
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "--no-such-option" in lines[0]
  assert result.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_option_without_value_fails_with_one_line(script):
  result = run(script, "--config", env={"BUCKET": "b", "DRY_RUN": "1"})
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "--config needs a value" in lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_gets_the_args_after_dashes_then_extra_args(script):
  result = run(script, "--dry-run", "--config=configs/c.py:shot=1", "--", "--a=1",
               env={"BUCKET": "b", "PORT": "1", "NUM_PROCESSES": "1", "EXTRA_ARGS": "--b=2 --c=3"})
  assert result.returncode == 0, result.stderr
  runs = [line for line in result.stdout.splitlines() if "metadiff_jax.main" in line]
  assert len(runs) == 1
  assert "-m metadiff_jax.main --config configs/c.py:shot=1 --workdir " in runs[0]
  assert "--a=1 --b=2 --c=3" in runs[0]


# --- launch/tpu_pod.sh -------------------------------------------------------------------

def test_tpu_dry_run_prints_every_step():
  result = run("tpu_pod.sh", "--dry-run", "--spot", "--config", "configs/glyphs_conv4.py:shot=1",
               "--", "--config.train.steps=2000",
               env={"BUCKET": "my-bucket", "NAME": "md-test", "ZONE": "us-central2-b",
                    "TYPE": "v4-32", "RUNTIME": "tpu-ubuntu2204-base"})
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  create, *rest = cmds
  assert create.startswith("gcloud compute tpus tpu-vm create md-test ")
  for part in ("--zone=us-central2-b", "--accelerator-type=v4-32",
               "--version=tpu-ubuntu2204-base", "--spot"):
    assert part in create
  # The code, gcsfuse, the install and the run go to every worker.
  ssh = [c for c in cmds if " tpu-vm ssh md-test " in c]
  assert len(ssh) >= 4 and all("--worker=all" in c for c in ssh)
  assert any(" tpu-vm scp " in c and "--worker=all" in c for c in cmds)
  assert any("gcsfuse --implicit-dirs" in c and "my-bucket /mnt/my-bucket" in c for c in ssh)
  assert any('pip install -q -e . "jax[tpu]"' in c for c in ssh)
  main = [c for c in ssh if "python -m metadiff_jax.main" in c]
  assert len(main) == 1
  for part in ("--config configs/glyphs_conv4.py:shot=1",
               "--workdir /mnt/my-bucket/runs/md-test",
               "--config.data.data_dir=/mnt/my-bucket/tensorflow_datasets",
               "--config.train.steps=2000"):
    assert part in main[0]
  # The run comes after the setup, and the slice is deleted last.
  assert cmds.index(main[0]) == len(cmds) - 2
  assert cmds[-1] == "gcloud compute tpus tpu-vm delete md-test --zone=us-central2-b --quiet"


def test_tpu_dry_run_clones_a_git_url_and_keeps_the_slice():
  result = run("tpu_pod.sh", "--dry-run", "--keep", "--repo=https://example.com/me/md.git",
               "--ref", "v1", "--project", "proj",
               env={"BUCKET": "gs://b2/", "WORKDIR": "/mnt/b2/runs/x", "EXTRA_ARGS": "--a=1 --b=2"})
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  assert all("--project=proj" in c for c in cmds if c.startswith("gcloud"))
  assert any("git clone --depth=1 --branch=v1 https://example.com/me/md.git" in c for c in cmds)
  assert not any(" scp " in c for c in cmds)
  assert any("--workdir /mnt/b2/runs/x" in c and "--a=1 --b=2" in c for c in cmds)
  assert not any(" delete " in c for c in cmds)
  assert "KEEP=1" in result.stderr and "tpu-vm delete metadiff-tpu" in result.stderr


def test_tpu_needs_a_bucket():
  result = run("tpu_pod.sh", "--dry-run")
  assert result.returncode != 0
  assert result.stderr.count("\n") == 1 and "BUCKET" in result.stderr


@pytest.fixture
def fake_gcloud(tmp_path):
  """A `gcloud` that logs its arguments and fails the training run when FAIL_RUN=1."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud.log"
  write_executable(bin_dir / "gcloud", f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {log}
if [[ "$4" == scp ]]; then cp "$5" {tmp_path}/copied.tgz; fi
if [[ "${{FAIL_RUN:-0}}" == 1 && "$*" == *metadiff_jax.main* ]]; then exit 7; fi
exit 0
""")
  return bin_dir, log


def test_tpu_deletes_the_slice_when_the_run_fails(fake_gcloud, tmp_path):
  bin_dir, log = fake_gcloud
  code = tmp_path / "code"  # a checkout that is not a git repository: copied with tar
  (code / "configs").mkdir(parents=True)
  (code / "configs" / "c.py").write_text("# a config\n")
  result = run("tpu_pod.sh", "--name", "md-fail", env={
      "BUCKET": "b", "REPO": str(code), "FAIL_RUN": "1", "TMPDIR": str(tmp_path)},
      path_first=bin_dir)
  assert result.returncode == 7
  calls = log.read_text().splitlines()
  assert calls[0].startswith("compute tpus tpu-vm create md-fail")
  assert "metadiff_jax.main" in calls[-2]
  assert calls[-1].startswith("compute tpus tpu-vm delete md-fail")
  assert not list(tmp_path.glob("metadiff_jax-*.tgz"))  # the tarball is removed


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_tpu_copies_the_checkout_without_ignored_or_deleted_files(fake_gcloud, tmp_path):
  bin_dir, _ = fake_gcloud
  code = tmp_path / "code"
  code.mkdir()
  git = ["git", "-C", str(code), "-c", "user.email=t@example.com", "-c", "user.name=t"]
  for name, text in (("tracked.py", "1"), ("gone.py", "2"), (".gitignore", "runs/\n")):
    (code / name).write_text(text)
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
  (code / "gone.py").unlink()
  (code / "new.py").write_text("3")
  (code / "runs").mkdir()
  (code / "runs" / "big.npz").write_text("ignored")
  result = run("tpu_pod.sh", env={"BUCKET": "b", "REPO": str(code), "TMPDIR": str(tmp_path)},
               path_first=bin_dir)
  assert result.returncode == 0, result.stderr
  listing = subprocess.run(["tar", "-tzf", str(tmp_path / "copied.tgz")], capture_output=True,
                           text=True, check=True).stdout.split()
  assert sorted(listing) == [".gitignore", "new.py", "tracked.py"]


def test_tpu_keep_leaves_the_slice(fake_gcloud):
  bin_dir, log = fake_gcloud
  result = run("tpu_pod.sh", env={"BUCKET": "b", "KEEP": "1", "REPO": "git@example.com:m.git"},
               path_first=bin_dir)
  assert result.returncode == 0, result.stderr
  calls = log.read_text().splitlines()
  assert "metadiff_jax.main" in calls[-1]
  assert not any(" delete " in c for c in calls)


# --- launch/slurm_gpu.sh -----------------------------------------------------------------

def test_slurm_dry_run_prints_the_script_and_sbatch():
  result = run("slurm_gpu.sh", "--dry-run", "--nodes", "2", "--gpus-per-node=4",
               "--workdir", "/shared/runs/x", "--", "--config.train.steps=100",
               env={"PARTITION": "gpu", "TIME": "02:00:00", "VENV": "/shared/venv",
                    "CONFIG": "configs/cifar_fs_resnet12.py", "DATA_DIR": "/shared/tfds",
                    "SETUP": "module load cuda/12"})
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --gres=gpu:4", "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00",
               "#SBATCH --output=/shared/runs/x/logs/slurm-%j.out", "module load cuda/12",
               "source /shared/venv/bin/activate", "export JAX_LOCAL_DEVICE_IDS=0,1,2,3"):
    assert line in out.splitlines(), line
  srun = [line for line in out.splitlines() if line.startswith("srun ")]
  assert len(srun) == 1
  assert ("python -m metadiff_jax.main --config configs/cifar_fs_resnet12.py "
          "--workdir /shared/runs/x --config.data.data_dir=/shared/tfds "
          "--config.train.steps=100") in srun[0]
  cmds = commands(out)
  assert re.fullmatch(r"sbatch --parsable /shared/runs/x/slurm/metadiff-[0-9-]+\.sbatch",
                      cmds[-1])
  assert not os.path.exists("/shared/runs/x")


def test_slurm_submits_the_written_script(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  submitted = tmp_path / "submitted.sbatch"
  write_executable(bin_dir / "sbatch",
                   f'#!/usr/bin/env bash\ncp "${{@: -1}}" {submitted}\necho "4242;cluster"\n')
  workdir = tmp_path / "run"
  result = run("slurm_gpu.sh", "--nodes=3", env={"WORKDIR": str(workdir), "VENV": ""},
               path_first=bin_dir)
  assert result.returncode == 0, result.stderr
  assert "submitted job 4242" in result.stdout
  assert f"{workdir}/logs/slurm-4242.out" in result.stdout
  text = submitted.read_text()
  assert "#SBATCH --nodes=3" in text and "#SBATCH --gres=gpu:8" in text
  assert "source " not in text  # VENV="": the nodes' own python
  assert list((workdir / "slurm").glob("metadiff-*.sbatch"))
  assert (workdir / "logs").is_dir()


# --- launch/local.sh ---------------------------------------------------------------------

def test_local_dry_run_prints_one_command_per_process():
  result = run("local.sh", "--dry-run", "-n", "3", "--workdir", "runs/t",
               "--", "--config.train.steps=10", env={"PYTHON": "python3"})
  assert result.returncode == 0, result.stderr
  cmds = [c for c in commands(result.stdout) if "metadiff_jax.main" in c]
  assert len(cmds) == 3
  ports = set()
  for i, cmd in enumerate(cmds):
    assert cmd.startswith("python3 -m metadiff_jax.main --config configs/glyphs_conv4.py "
                          "--workdir runs/t ")
    assert f"--process_id={i} " in cmd and "--num_processes=3" in cmd
    assert cmd.endswith(f"--config.train.steps=10 > runs/t/logs/process_{i}.log 2>&1 &")
    ports.add(re.search(r"--coordinator_address=127\.0\.0\.1:(\d+)", cmd).group(1))
  assert len(ports) == 1  # one coordinator, found free by python
  assert "mkdir -p runs/t/logs" in commands(result.stdout)
  assert not (REPO / "runs" / "t").exists()


def test_local_cpu_simulation_sets_jax_platforms_and_device_count():
  result = run("local.sh", "--dry-run", env={
      "NUM_PROCESSES": "2", "PORT": "23456", "CPU": "1", "DEVICES_PER_PROCESS": "4"})
  assert result.returncode == 0, result.stderr
  cmds = [c for c in commands(result.stdout) if "metadiff_jax.main" in c]
  assert len(cmds) == 2
  for i, cmd in enumerate(cmds):
    assert cmd.startswith("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
                          "python -m metadiff_jax.main ")
    assert f"--coordinator_address=127.0.0.1:23456 --num_processes=2 --process_id={i}" in cmd


def test_local_splits_gpus_between_processes():
  result = run("local.sh", "--dry-run", "--devices-per-process", "2", env={
      "NUM_PROCESSES": "2", "PORT": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
  cmds = [c for c in commands(result.stdout) if "metadiff_jax.main" in c]
  assert cmds[0].startswith("CUDA_VISIBLE_DEVICES=4,5 ")
  assert cmds[1].startswith("CUDA_VISIBLE_DEVICES=6,7 ")


@pytest.fixture
def fake_python(tmp_path):
  """A `python` that logs its arguments; process FAIL_ID fails, the others wait to be killed."""
  return write_executable(tmp_path / "python", """#!/usr/bin/env bash
for a in "$@"; do case "$a" in --process_id=*) id="${a#*=}" ;; esac; done
echo "process $id: $*"
if [[ "$id" == "${FAIL_ID:-none}" ]]; then echo "Traceback: process $id broke" >&2; exit 3; fi
if [[ -n "${FAIL_ID:-}" ]]; then exec sleep 60; fi
exit 0
""")


def test_local_runs_all_processes_and_waits(fake_python, tmp_path):
  workdir = tmp_path / "w"
  result = run("local.sh", "--workdir", str(workdir), "--", "--x=1",
               env={"PYTHON": str(fake_python), "NUM_PROCESSES": "3", "PORT": "34567"})
  assert result.returncode == 0, result.stderr
  assert "all 3 processes finished" in result.stdout
  for i in range(3):
    log = (workdir / "logs" / f"process_{i}.log").read_text()
    assert f"--coordinator_address=127.0.0.1:34567 --num_processes=3 --process_id={i} --x=1" in log


def test_local_failure_names_the_process_and_stops_the_others(fake_python, tmp_path):
  workdir = tmp_path / "w"
  result = run("local.sh", "--workdir", str(workdir), env={
      "PYTHON": str(fake_python), "NUM_PROCESSES": "3", "PORT": "34568", "FAIL_ID": "1"},
      timeout=20)
  assert result.returncode == 3
  assert "error: process 1 of 3 failed (exit status 3)" in result.stderr
  assert "Traceback: process 1 broke" in result.stderr  # the tail of its log
  assert str(workdir / "logs" / "process_1.log") in result.stderr
