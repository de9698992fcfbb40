#!/usr/bin/env bash
# The main job: train the default model if none exists at VAE_MODEL_PATH, then serve it.
# Used by `make run` and as the container's command. Settings come from VAE_* variables.
set -euo pipefail

python=${PYTHON:-python}
export VAE_MODEL_PATH=${VAE_MODEL_PATH:-models/vae.pt}
data=${VAE_DATA_DIR:-data/mnist}

if [ ! -f "$VAE_MODEL_PATH" ]; then
  extra=()
  # Fetch MNIST (md5-checked) only when the data dir holds neither layout the trainer reads.
  if ! compgen -G "$data/train-images-idx3-ubyte*" >/dev/null && [ ! -f "$data/train.npy" ]; then
    extra+=(--download)
  fi
  echo "serve.sh: no model at $VAE_MODEL_PATH; training the '${VAE_TRAIN_PRESET:-quick}' preset on $data" >&2
  "$python" -m training --data-dir "$data" --out "$VAE_MODEL_PATH" \
    --preset "${VAE_TRAIN_PRESET:-quick}" --no-progress "${extra[@]}"
fi
exec "$python" -m app
