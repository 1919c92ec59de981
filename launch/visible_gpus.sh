#!/usr/bin/env bash
# The number of GPUs this process may use, as CUDA counts them: only those CUDA_VISIBLE_DEVICES names (SLURM
# sets it for a job), a MIG instance as one device. The same count is `accelerate launch --multi_gpu`'s
# default. `nvidia-smi -L` would list every GPU of the machine, whatever CUDA_VISIBLE_DEVICES says.
#   CUDA_VISIBLE_DEVICES=0,1 launch/visible_gpus.sh   # 2 on a machine of 8
exec python3 -c 'import torch; print(torch.cuda.device_count())'
