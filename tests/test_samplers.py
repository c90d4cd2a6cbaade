"""Samplers: closed forms, a known ODE, DDIM equivalence and reproducibility."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from patchmosaic import (
    PRESETS,
    CosineSchedule,
    ScoreMachine,
    noise_for_seed,
    noise_for_seeds,
    sample,
    sample_ancestral,
    sample_euler,
    sample_heun,
    sigmas_cosine,
    sigmas_karras,
)
from patchmosaic.samplers import denoiser_calls, initial_state, sample_seeds

S2 = 0.25  # variance of the Gaussian data x0 ~ N(0, S2 I)


def gaussian_denoiser(x, sigma):
    """The exact denoiser of N(0, S2 I): E[x0 | x] = S2 / (S2 + sigma^2) x."""
    return (S2 / (S2 + sigma.square()))[:, None, None, None] * x


def pf_ode_solution(x, sigma_from, sigma_to):
    """dx/dsigma = sigma x / (S2 + sigma^2) keeps x / sqrt(S2 + sigma^2) constant."""
    return x * math.sqrt((S2 + sigma_to**2) / (S2 + sigma_from**2))


def _ode_error(sampler, n):
    sigmas = sigmas_karras(n, sigma_min=0.05, sigma_max=20.0)[:-1]  # ends at sigma_min > 0
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20.0
    got = sampler(gaussian_denoiser, x, sigmas)
    want = pf_ode_solution(x, 20.0, 0.05)
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("sampler,order", [(sample_euler, 1.0), (sample_heun, 2.0)])
def test_convergence_order_on_the_gaussian_probability_flow(sampler, order):
    ns = [8, 16, 32, 64]
    errs = [_ode_error(sampler, n) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.25, (errs, slope)
    assert errs[-1] < (5e-2 if order == 1 else 5e-3)  # measured: 2.7e-2 and 1.3e-3 at n = 64


def test_euler_is_deterministic_ddim():
    """The VE Euler step equals the paper's VP DDIM update, step for step."""
    sched = CosineSchedule()
    steps = 7
    noise = torch.randn(2, 1, 3, 3, dtype=torch.float64)

    def vp_denoiser(x_t, ab):  # the same Gaussian posterior mean, in VP variables
        return math.sqrt(ab) * S2 / (ab * S2 + 1 - ab) * x_t

    x = noise
    ts = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    abar = sched.alpha_bar(ts).tolist()
    for j in range(steps):
        x0 = vp_denoiser(x, abar[j])
        eps = (x - abar[j] ** 0.5 * x0) / (1 - abar[j]) ** 0.5
        x = abar[j + 1] ** 0.5 * x0 + max(0.0, 1 - abar[j + 1]) ** 0.5 * eps
    got = sample(gaussian_denoiser, noise, steps=steps)
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


def _vp_ddim(machine, noise, sizes, schedule=None):
    """The paper's DDIM loop on the VP API, sizes[i - 1] at t = i / n (lowest noise first)."""
    schedule = schedule or CosineSchedule()
    n = len(sizes)
    ts = torch.arange(n, -1, -1, dtype=torch.float64) / n
    abar = schedule.alpha_bar(ts).tolist()
    x = noise
    for j in range(n):
        x0 = machine.denoise(x, abar[j], patch_size=sizes[n - 1 - j])
        eps = (x - abar[j] ** 0.5 * x0) / (1 - abar[j]) ** 0.5
        x = abar[j + 1] ** 0.5 * x0 + max(0.0, 1 - abar[j + 1]) ** 0.5 * eps
    return x


def test_sigma_keyed_presets_reproduce_the_20_step_samples():
    train = torch.rand(6, 1, 16, 16, dtype=torch.float64) * 2 - 1
    machine = ScoreMachine(train, kind="els", padding="zeros")
    noise = noise_for_seeds([0, 1], (1, 16, 16), dtype=torch.float64)
    sizes = PRESETS["mnist-resnet-zeros"].sizes
    assert PRESETS["mnist-resnet-zeros"].on_grid(sigmas_cosine(20))[::-1] == sizes
    got = sample(machine, noise, steps=20, patch_sizes="mnist-resnet-zeros")
    torch.testing.assert_close(got, _vp_ddim(machine, noise, sizes), rtol=1e-9, atol=1e-9)


def test_non_default_noise_schedule_binds_the_same_schedule():
    """Regression: sizes given as a list are keyed to the sampler's own noise schedule."""
    train = torch.rand(5, 1, 8, 8, dtype=torch.float64) * 2 - 1
    machine = ScoreMachine(train, kind="els", padding="zeros")
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sched = CosineSchedule(s=0.3)
    got = sample(machine, noise, steps=3, patch_sizes=[3, 5, 7], schedule=sched)
    want = _vp_ddim(machine, noise, [3, 5, 7], sched)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    default = sample(machine, noise, steps=3, patch_sizes=[3, 5, 7])
    assert (got - default).abs().max() > 1e-3  # the schedule matters, and was used


def test_presets_run_on_any_grid_and_step_count():
    train = torch.rand(4, 1, 16, 16) * 2 - 1
    bound = ScoreMachine(train, kind="els").bind(patch_sizes="mnist-resnet-zeros")
    seen = []
    recording = lambda x, sigma: (seen.append((float(sigma[0]), bound.patch_size_at(sigma[0]))), bound(x, sigma))[1]
    sigmas = sigmas_karras(18)
    out = sample_heun(recording, initial_state(torch.randn(2, 1, 16, 16), sigmas), sigmas)
    assert torch.isfinite(out).all() and len(seen) == denoiser_calls("heun", sigmas) == 35
    assert seen[0][1] == 15 and seen[-1][1] == 3  # published: 15 at the highest noise, 3 at the lowest


def test_single_training_image_is_reproduced_exactly():
    image = torch.rand(1, 1, 6, 6, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    for machine, sizes in [(ScoreMachine(image, kind="ideal"), None),
                           (ScoreMachine(image, kind="ls"), [3, 5, 5, 5])]:
        out = sample(machine, noise, steps=4, patch_sizes=sizes)
        torch.testing.assert_close(out, image.expand(3, -1, -1, -1), rtol=0, atol=1e-12)


def test_patch_size_per_sigma_lowest_noise_first():
    train = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    bound = ScoreMachine(train, kind="els").bind(patch_sizes=[1, 3, 5, 7])
    sig = sigmas_cosine(4)
    assert [bound.patch_size_at(s) for s in sig[:-1]] == [7, 5, 3, 1]
    sched = CosineSchedule()
    assert [round(float(sched.t_from_sigma(s)), 6) for s in sig[:-1]] == [1.0, 0.75, 0.5, 0.25]


def test_mixed_sigmas_in_one_batch_use_each_rows_patch_size():
    train = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    machine = ScoreMachine(train, kind="els")
    bound = machine.bind(patch_sizes=[3, 5, 7, 7])
    sig = sigmas_cosine(4)[[0, 3]]  # k = 7 and k = 3
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    got = bound(x, sig)
    for b, k in enumerate((7, 3)):
        torch.testing.assert_close(got[b : b + 1], machine(x[b : b + 1], sig[b : b + 1], patch_size=k))


def test_callback_sees_every_step_and_the_last_denoised_is_the_result():
    machine = ScoreMachine(torch.rand(4, 1, 5, 5, dtype=torch.float64), kind="ideal")
    calls = []
    out = sample(machine, torch.randn(2, 1, 5, 5, dtype=torch.float64), steps=3,
                 callback=lambda info: calls.append(info))
    sig = sigmas_cosine(3).tolist()
    assert [(c["i"], c["sigma"], c["sigma_next"]) for c in calls] == [(0, sig[0], sig[1]), (1, sig[1], sig[2]),
                                                                     (2, sig[2], 0.0)]
    torch.testing.assert_close(out, calls[-1]["denoised"])


def test_ancestral_is_reproducible_from_its_generator_and_batch_independent():
    train = torch.rand(5, 1, 6, 6, dtype=torch.float64) * 2 - 1
    machine = ScoreMachine(train, kind="ideal")
    sigmas = sigmas_karras(6)
    run = lambda seed: sample_ancestral(machine, initial_state(noise_for_seeds([0], (1, 6, 6), dtype=torch.float64),
                                        sigmas), sigmas, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1), run(2))
    together = sample_seeds(machine, [3, 4], (1, 6, 6), sigmas=sigmas, sampler="ancestral", dtype=torch.float64)
    alone = sample_seeds(machine, [4], (1, 6, 6), sigmas=sigmas, sampler="ancestral", dtype=torch.float64)
    torch.testing.assert_close(together[1:], alone, rtol=0, atol=0)


def test_grids_are_checked():
    x = torch.randn(1, 1, 3, 3)
    for bad in ([1.0], [1.0, 2.0], [1.0, 0.0, 0.0], [float("nan"), 0.0]):
        with pytest.raises(ValueError, match="sigmas"):
            sample_euler(gaussian_denoiser, x, torch.tensor(bad))


def test_patch_machines_need_a_schedule_and_plain_denoisers_take_none():
    with pytest.raises(ValueError, match="needs a patch_size"):
        sample(ScoreMachine(torch.rand(2, 1, 5, 5), kind="els"), torch.randn(1, 1, 5, 5), steps=2)
    with pytest.raises(TypeError, match="has no bind"):
        sample(lambda x, s: x, torch.randn(1, 1, 5, 5), steps=2, patch_sizes=[3, 3])


def test_noise_for_seed_is_the_documented_function():
    want = torch.randn((1, 4, 4), generator=torch.Generator("cpu").manual_seed(7))
    torch.testing.assert_close(noise_for_seed(7, (1, 4, 4)), want, rtol=0, atol=0)
    torch.testing.assert_close(noise_for_seeds([3, 7], (1, 4, 4))[1], want, rtol=0, atol=0)
    assert not torch.equal(noise_for_seed(3, (1, 4, 4)), want)
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match="seeds must lie in 0"):
            noise_for_seed(bad, (1, 4, 4))


def test_the_core_imports_no_file_io_pil_or_cli():
    code = (
        "import sys; import patchmosaic, patchmosaic.samplers, patchmosaic.engine, patchmosaic.denoisers; "
        "bad = sorted(m for m in sys.modules if m == 'PIL' or m.startswith(('PIL.', 'click', 'matplotlib', "
        "'patchmosaic.cli', 'patchmosaic.runs', 'patchmosaic.report', 'patchmosaic.explain'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
