"""DDIM sampler: closed forms, a known ODE, and the schedule's time indexing."""

from __future__ import annotations

import pytest
import torch

from patchmosaic import CosineSchedule, ScoreMachine, noise_for_seed, noise_for_seeds, sample


def test_single_training_image_is_reproduced_exactly():
    image = torch.rand(1, 1, 6, 6, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    for machine, sizes in [(ScoreMachine(image, kind="ideal"), None),
                           (ScoreMachine(image, kind="ls"), [3, 5, 5, 7])]:
        out = sample(machine, noise, steps=4, patch_sizes=sizes)
        torch.testing.assert_close(out, image.expand(3, -1, -1, -1), rtol=0, atol=1e-12)


def test_gaussian_data_follows_the_probability_flow_ode():
    # For x0 ~ N(0, s^2 I) the exact denoiser is linear and the probability-flow
    # ODE keeps x_t / sqrt(abar s^2 + 1 - abar) constant; DDIM converges to it.
    s2, sched = 0.25, CosineSchedule()

    def gaussian_denoiser(x, t):
        ab = float(sched.alpha_bar(t))
        return ab**0.5 * s2 / (ab * s2 + 1 - ab) * x

    noise = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    out = sample(gaussian_denoiser, noise, steps=500)
    ab1 = float(sched.alpha_bar(1.0))
    want = noise * (s2 / (ab1 * s2 + 1 - ab1)) ** 0.5
    torch.testing.assert_close(out, want, rtol=5e-3, atol=0)


def test_patch_size_for_t_is_sizes_at_i_minus_1():
    train = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    machine = ScoreMachine(train, kind="els")
    seen = []
    original = machine.denoise

    def recording(x, ab, **kw):
        seen.append((float(CosineSchedule().t_from_alpha_bar(ab)), kw["patch_size"]))
        return original(x, ab, **kw)

    machine.denoise = recording
    sample(machine, torch.randn(1, 1, 8, 8, dtype=torch.float64), steps=4, patch_sizes=[3, 5, 7, 9])
    assert [k for _, k in seen] == [9, 7, 5, 3]
    assert [round(t, 6) for t, _ in seen] == [1.0, 0.75, 0.5, 0.25]


def test_callback_sees_every_step_and_last_x0_is_the_result():
    machine = ScoreMachine(torch.rand(4, 1, 5, 5, dtype=torch.float64), kind="ideal")
    calls = []
    out = sample(machine, torch.randn(2, 1, 5, 5, dtype=torch.float64), steps=3,
                 callback=lambda i, t, x, x0: calls.append((i, t, x0.clone())))
    assert [(i, t) for i, t, _ in calls] == [(3, 1.0), (2, 2 / 3), (1, 1 / 3)]
    torch.testing.assert_close(out, calls[-1][2])


def test_schedule_length_must_match_steps():
    machine = ScoreMachine(torch.rand(2, 1, 5, 5), kind="els")
    with pytest.raises(ValueError, match="3 sizes but the sampler runs 4 steps"):
        sample(machine, torch.randn(1, 1, 5, 5), steps=4, patch_sizes=[3, 3, 3])


def test_patch_machines_need_a_schedule_and_plain_denoisers_take_none():
    with pytest.raises(ValueError, match="needs patch_sizes"):
        sample(ScoreMachine(torch.rand(2, 1, 5, 5), kind="els"), torch.randn(1, 1, 5, 5), steps=2)
    with pytest.raises(TypeError, match="has no bind"):
        sample(lambda x, t: x, torch.randn(1, 1, 5, 5), steps=2, patch_sizes=[3, 3])


def test_noise_for_seed_is_the_documented_function():
    want = torch.randn((1, 4, 4), generator=torch.Generator("cpu").manual_seed(7))
    torch.testing.assert_close(noise_for_seed(7, (1, 4, 4)), want, rtol=0, atol=0)
    torch.testing.assert_close(noise_for_seeds([3, 7], (1, 4, 4))[1], want, rtol=0, atol=0)
    assert not torch.equal(noise_for_seed(3, (1, 4, 4)), want)
    with pytest.raises(ValueError, match="non-negative"):
        noise_for_seed(-1, (1, 4, 4))
