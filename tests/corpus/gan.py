"""A GAN with two optimizers (modelled on the shape of the DCGAN tutorial's loop, with MLPs):
the discriminator steps on real and detached fake samples, then the generator steps through
the discriminator.  Plain PyTorch unless ``--traced`` (one ``trace_step`` per iteration).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--traced", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(999)
    nz, nx, b = 64, 256, 256
    netG = nn.Sequential(nn.Linear(nz, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, nx), nn.Tanh())
    netD = nn.Sequential(
        nn.Linear(nx, 512), nn.LeakyReLU(0.2), nn.Linear(512, 512), nn.LeakyReLU(0.2), nn.Linear(512, 1)
    )
    criterion = nn.BCEWithLogitsLoss()
    optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    step_ctx = contextlib.nullcontext
    if args.traced:
        import traceml

        @contextlib.contextmanager
        def step_ctx():  # type: ignore[misc]
            # one step that times both models' forward: the inner trace_step is the same step
            with traceml.trace_step(netG), traceml.trace_step(netD):
                yield

    real_data = torch.tanh(torch.randn(2048, nx))
    ones, zeros = torch.ones(b, 1), torch.zeros(b, 1)
    for i in range(args.iters):
        real = real_data[(i * b) % 2048 : (i * b) % 2048 + b]
        with step_ctx():
            netD.zero_grad()
            errD_real = criterion(netD(real), ones)
            errD_real.backward()
            fake = netG(torch.randn(b, nz))
            errD_fake = criterion(netD(fake.detach()), zeros)
            errD_fake.backward()
            optD.step()
            netG.zero_grad()
            errG = criterion(netD(fake), ones)
            errG.backward()
            optG.step()
    print(f"done lossD={(errD_real + errD_fake).item():.3f} lossG={errG.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
