"""Run under `accelerate launch`: record which training images each rank gets per epoch.

Used by test_distributed.py. The images are synthetic: image i stores i in its
first two pixels, which survive normalisation when augmentation is off.
"""
import json
import sys

import torch
from accelerate import Accelerator

from mnist_dist.data import MEAN, STD, make_loaders, sharding
from mnist_dist.settings import Settings

root, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = Settings(rotation=0, shift=0, batch_size=batch)
accelerator = Accelerator(cpu=True, dataloader_config=sharding(s.seed))
train_loader, *_ = make_loaders(s, root, accelerator.device)
train_loader = accelerator.prepare(train_loader)
epochs = []
for epoch in (1, 2):
    train_loader.set_epoch(epoch)
    ids = []
    for x, _ in train_loader:
        raw = torch.round((x[:, 0, 0, :2] * STD + MEAN) * 255).long()
        ids += (raw[:, 0] + 256 * raw[:, 1]).tolist()
    epochs.append(ids)
with open(f"{out}/rank{accelerator.process_index}.json", "w") as f:
    json.dump(epochs, f)
