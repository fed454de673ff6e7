"""Install hygiene: an installed qwen3vl owns no top-level name but `qwen3vl` (Hugging Face's `kernels` package is
what transformers imports), and a source checkout's top-level kernels/ folder stands aside for that package, or
looks like nothing when it is not installed."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, cwd: str, path: str | None = None) -> str:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  if path:
    env["PYTHONPATH"] = path
  out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """The wheel `pip` builds from this checkout, installed (without dependencies) into a folder of its own."""
  tmp = tmp_path_factory.mktemp("install")
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ROOT, "-w", str(tmp / "wheel")],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp))
  if build.returncode != 0 and "Could not find a version" in build.stderr:
    pytest.skip("pip cannot fetch setuptools for the build (no package index)")
  assert build.returncode == 0, build.stderr[-3000:]
  wheel = next((tmp / "wheel").glob("qwen3vl-*.whl"))
  target = tmp / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                 check=True, capture_output=True, timeout=300)
  return wheel, target


def test_wheel_holds_only_qwen3vl_and_every_package_of_the_checkout(installed):
  wheel, _ = installed
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert tops == {"qwen3vl"}, tops
  want = set()
  for folder, prefix in (("qwen3vl", "qwen3vl"), ("kernels", "qwen3vl/kernels"), ("configs", "qwen3vl/configs")):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
      want.update(os.path.normpath(os.path.join(prefix, rel, f)) for f in files if f.endswith((".py", ".json")))
  missing = sorted(want - set(names))
  assert not missing, f"pyproject.toml's package list misses {missing}"


def test_installed_package_imports_without_top_level_kernels_or_configs(installed, tmp_path):
  _, target = installed
  out = _run("import importlib.util as u, qwen3vl.kernels as k, qwen3vl.configs.dense as d\n"
             "print(u.find_spec('kernels'), u.find_spec('configs'), k.__file__)\n"
             "print(d.get_config('tiny').model.text.hidden_size > 0, callable(k.attention))",
             cwd=str(tmp_path), path=str(target))
  first, second = out.strip().splitlines()
  assert first.startswith("None None ") and first.endswith(os.path.join("site", "qwen3vl", "kernels", "__init__.py"))
  assert second == "True True"


def test_source_checkout_kernels_folder_is_empty_under_its_top_level_name():
  # What transformers does with a `kernels` it finds on sys.path without package metadata: import it and read
  # __version__. Ours must import without JAX, export nothing, and leave qwen3vl.kernels working beside it.
  out = _run("import sys, kernels\n"
             "print(sorted(a for a in vars(kernels) if not a.startswith('__')), getattr(kernels, '__version__', None),"
             " 'jax' in sys.modules)\n"
             "import qwen3vl.kernels\n"
             "print(qwen3vl.kernels.attention.__module__, qwen3vl.kernels.__file__ == kernels.__file__)",
             cwd=ROOT)
  assert out.strip().splitlines() == ["[] None False", "qwen3vl.kernels.dispatch True"]


def test_source_checkout_kernels_folder_stands_aside_for_an_installed_kernels(tmp_path):
  # transformers (5.x) imports `from kernels import ...` when the `kernels` distribution is installed; with the
  # repository root first on sys.path, that import must reach the installed package, not our folder.
  site = tmp_path / "site"
  (site / "kernels").mkdir(parents=True)
  (site / "kernels" / "__init__.py").write_text("__version__ = '0.19.1'\nclass CUDAProperties: pass\n")
  out = _run("import sys; sys.path.insert(0, '.')\n"
             "from kernels import CUDAProperties, __version__\nimport kernels, qwen3vl.kernels as ours\n"
             "print(__version__, kernels.__file__ != ours.__file__, ours.attention.__module__)",
             cwd=ROOT, path=str(site))
  assert out.strip().splitlines()[-1] == "0.19.1 True qwen3vl.kernels.dispatch"
