"""Recipe: edge-popup in a plain accelerate loop (an MLP on random data). One process:

    python integrations/accelerate_loop.py
Two CPU processes (accelerate launch --cpu starts one; torchrun starts real ranks):

    torchrun --nproc_per_node 2 integrations/accelerate_loop.py
"""

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from supermask_fx import popupify, save_subnetwork, supermask_parameters  # supermask_fx


def main():
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: torchrun's ranks join one group
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    model = popupify(model, k=0.5)  # supermask_fx: before prepare (DDP must see the scores)
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 20, generator=g), torch.randint(0, 4, (256,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for _ in range(3):
        for x, y in loader:
            optimizer.zero_grad()
            accelerator.backward(F.cross_entropy(model(x), y))
            optimizer.step()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        size = save_subnetwork(accelerator.unwrap_model(model), "subnetwork.safetensors")  # supermask_fx
        print(f"subnetwork.safetensors: {size} bytes")


if __name__ == "__main__":
    main()
