# Sourced by the scripts that run on a lent GPU (the device tool's machine): that machine has CUDA torch,
# transformers and peft but no diffusers and no network, so the diffusers wheel travels in .whl/ (fetch it here
# once with `scripts/train_shapes_gpu.sh --fetch-wheels`, and name .whl in the call's carry).
ls .whl/diffusers-*.whl > /dev/null || { echo "no .whl/diffusers-*.whl: run --fetch-wheels here and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# attnscope is not installed there either: lay this tree out in /tmp/site as `pip install .` would, as links into
# the tree (so the code that runs is this tree's), from pyproject.toml: the attnscope package with the top-level
# folders that install as its subpackages (lab/ as attnscope.lab, erase/, apps/), and the entry points through
# which they plug their commands (`attnscope shapes train`) and model profiles into attnscope.
python3 - /tmp/site <<'EOF'
import shutil, sys, tomllib
from pathlib import Path

site, tree = Path(sys.argv[1]), Path.cwd()
project = tomllib.loads((tree / "pyproject.toml").read_text())
folders = project["tool"]["setuptools"]["package-dir"]
root = site / "attnscope"
if root.exists():
    shutil.rmtree(root)  # links only: the tree stays
root.mkdir(parents=True)
for entry in (tree / folders["attnscope"]).iterdir():
    if entry.name != "__pycache__":
        (root / entry.name).symlink_to(entry)
for package, folder in folders.items():
    if package != "attnscope":
        (site / package.replace(".", "/")).symlink_to(tree / folder)
name, version = project["project"]["name"], project["project"]["version"]
for old in site.glob(f"{name}-*.dist-info"):
    shutil.rmtree(old)
info = site / f"{name}-{version}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
groups = {"console_scripts": project["project"].get("scripts", {}), **project["project"].get("entry-points", {})}
(info / "entry_points.txt").write_text(
    "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n" for group, points in groups.items())
)
EOF
# PYTHONSAFEPATH: `python3 -m attnscope.cli` must not put the tree's own attnscope/ (no lab/ in it) before /tmp/site's.
export PYTHONPATH="/tmp/site:$PWD" PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)"
