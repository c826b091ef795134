# Sourced by the scripts that run on a lent GPU (the device tool's machine): that machine has CUDA torch,
# transformers and peft but no diffusers and no network, so the diffusers wheel travels in .whl/ (fetch it here
# once with `scripts/train_shapes_gpu.sh --fetch-wheels`, and name .whl in the call's carry).
ls .whl/diffusers-*.whl > /dev/null || { echo "no .whl/diffusers-*.whl: run --fetch-wheels here and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)"
