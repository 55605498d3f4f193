"""diffprune.optim.AdamW: torch's AdamW for fp32 tensors, unbiased stochastic rounding for bf16 ones
(the gate logits of `--alpha-dtype bf16`), deterministic and resumable."""

from __future__ import annotations

import copy

import pytest
import torch

from diffprune import DiffModel, DiffPruningConfig
from diffprune.lean import OptimizerInBackward
from diffprune.optim import AdamW, add_stochastic_, stochastic_round_

from .tiny_models import bert_batch, tiny_bert


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.full((200_000,), 5.01)  # between the bf16 values 5.0 and 5.03125
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    stochastic_round_(out, x.clone(), torch.randint(0, 1 << 16, x.shape, dtype=torch.int32,
                                                    generator=torch.Generator().manual_seed(0)))
    assert set(out.float().unique().tolist()) == {5.0, 5.03125}
    assert out.float().mean().item() == pytest.approx(5.01, abs=2e-4)  # round-to-nearest gives 5.0
    neg = torch.full((200_000,), -5.01)
    stochastic_round_(out, neg.clone(), torch.randint(0, 1 << 16, x.shape, dtype=torch.int32,
                                                      generator=torch.Generator().manual_seed(1)))
    assert out.float().mean().item() == pytest.approx(-5.01, abs=2e-4)
    exact = torch.tensor([5.0, -0.25, 0.0])
    stochastic_round_(out[:3], exact.clone(), torch.full((3,), 65535, dtype=torch.int32))
    assert out[:3].float().tolist() == [5.0, -0.25, 0.0]  # representable values never move


def test_a_long_bf16_sum_keeps_its_small_terms():
    """The candidate importance sum: 1,000 terms of 1.0 into bfloat16. Rounded to nearest it stops at
    256 (256 + 1 is a tie between 256 and 258, broken to even); stochastically it reaches ~1,000."""
    nearest = torch.zeros(4096, dtype=torch.bfloat16)
    ours = torch.zeros(4096, dtype=torch.bfloat16)
    one = torch.ones(4096)
    for step in range(1000):
        nearest.add_(one)
        add_stochastic_(ours, one, key=(step, 0))
    assert torch.all(nearest == 256)
    assert ours.float().mean().item() == pytest.approx(1000, rel=0.01)
    again = torch.zeros(4096, dtype=torch.bfloat16)
    for step in range(1000):
        add_stochastic_(again, one, key=(step, 0))
    assert torch.equal(again, ours)  # deterministic in its key


@pytest.mark.parametrize("fused", [False, True])
def test_fp32_tensors_step_exactly_as_torch_adamw(fused):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3000))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.01, fused=fused)
    ours = AdamW([b], lr=1e-2, weight_decay=0.01, fused=fused)
    for _ in range(4):
        g = torch.randn(3000)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert torch.equal(a, b)


def _drift(opt_cls, dtype, steps=300, **kw):
    """Adam on 4096 entries at 5.0 with a small steady gradient under noise (the L0 penalty's push on a
    gate logit whose task gradient is noisy): every update is below half a bf16 step at 5.0."""
    p = torch.nn.Parameter(torch.full((4096,), 5.0, dtype=dtype))
    opt = opt_cls([p], lr=0.01, weight_decay=0.0, **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        p.grad = (0.2 + torch.randn(4096, generator=gen)).to(dtype)
        opt.step()
    return p.detach().float()


def test_bf16_tensors_follow_fp32_where_round_to_nearest_stalls():
    fp32 = _drift(torch.optim.AdamW, torch.float32).mean().item()
    nearest = _drift(torch.optim.AdamW, torch.bfloat16)
    ours = _drift(AdamW, torch.bfloat16)
    assert fp32 < 5.0 - 0.3  # fp32 Adam moves the entries down
    assert abs(nearest.mean().item() - 5.0) < 0.05 * (5.0 - fp32)  # round to nearest: (almost) every update lost
    assert ours.mean().item() == pytest.approx(fp32, abs=0.03)  # stochastic rounding: the fp32 path on average
    assert ours.std().item() > 0  # entries round independently


def _bf16_model():
    return DiffModel(tiny_bert(), DiffPruningConfig(alpha_dtype="bf16", l0_lambda=1e-3, structured=True)).train()


def _train(dm, opt, seeds):
    for s in seeds:
        torch.manual_seed(100 + s)
        dm(**bert_batch(dm.model, seed=s)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _trainable(dm):
    return {n: p.detach().clone() for n, p in dm.named_parameters() if p.requires_grad}


def test_bf16_gate_logits_resume_and_in_backward_draw_the_same_bits():
    a = _bf16_model()
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    alphas = [p for n, p in a.named_parameters() if n.endswith("alpha")]
    assert alphas and all(p.dtype == torch.bfloat16 for p in alphas)
    opt_a = AdamW(a.param_groups(lr=1e-2, alpha_lr=0.1, fused=False), weight_decay=0.0)
    _train(a, opt_a, range(3))
    # resumed after 2 steps from a state_dict: the same tensors, bit for bit
    opt_b = AdamW(b.param_groups(lr=1e-2, alpha_lr=0.1, fused=False), weight_decay=0.0)
    _train(b, opt_b, range(2))
    state = copy.deepcopy(opt_b.state_dict())
    opt_b2 = AdamW(b.param_groups(lr=1e-2, alpha_lr=0.1, fused=False), weight_decay=0.0)
    opt_b2.load_state_dict(state)
    _train(b, opt_b2, [2])
    # stepped inside backward, one optimiser per tensor: the same random bits as one optimiser over all
    oib = OptimizerInBackward(c.param_groups(lr=1e-2, alpha_lr=0.1, fused=False), max_grad_norm=None, weight_decay=0.0)
    _train(c, oib, range(3))
    ref = _trainable(a)
    assert any(not torch.all(p == 5.0) for n, p in ref.items() if n.endswith("alpha"))
    for other in (b, c):
        got = _trainable(other)
        assert got.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=f"{n} ({'resumed' if other is b else 'in backward'})")



def test_fp32_tensors_with_bf16_moments_follow_fp32_adamw_and_resume_identically():
    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(5000) * 1e-3)
    start = ref.detach().clone()
    ours = torch.nn.Parameter(ref.detach().clone())
    again = torch.nn.Parameter(ref.detach().clone())
    o_ref = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0)
    o_ours = AdamW([{"params": [ours], "state_dtype": "bf16"}], lr=1e-3, weight_decay=0.0)
    o_again = AdamW([{"params": [again], "state_dtype": "bf16"}], lr=1e-3, weight_decay=0.0)
    grads = [torch.randn(5000, generator=torch.Generator().manual_seed(s)) + 0.3 for s in range(6)]
    for i, g in enumerate(grads):
        ref.grad, ours.grad, again.grad = g.clone(), g.clone(), g.clone()
        o_ref.step()
        o_ours.step()
        if i == 2:  # resume the third optimiser from its state_dict
            state = copy.deepcopy(o_again.state_dict())
            o_again = AdamW([{"params": [again], "state_dtype": "bf16"}], lr=1e-3, weight_decay=0.0)
            o_again.load_state_dict(state)
            assert o_again.state[again]["exp_avg"].dtype == torch.bfloat16  # not cast up to the parameter's
        o_again.step()
    st = o_ours.state[ours]
    assert ours.dtype == torch.float32 and st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    d_ref, d_ours = ref.detach() - start, ours.detach() - start
    assert (d_ours - d_ref).abs().max() < 0.01 * d_ref.abs().max()  # the steps, within bf16 moments' rounding
    assert torch.equal(ours, again)


def test_the_random_words_do_not_depend_on_how_the_stream_is_split_or_where_a_shard_starts():
    from diffprune.noise import Noise

    cpu = torch.device("cpu")
    whole = Noise((1, 2, 3), cpu).int32(1001)
    for splits in ([1, 1000], [3, 4, 994], [500, 1, 1, 499]):
        noise = Noise((1, 2, 3), cpu)
        assert torch.equal(torch.cat([noise.int32(k) for k in splits]), whole), splits
    for offset in (1, 2, 7, 500):  # an FSDP shard starting at that flat position
        noise = Noise((1, 2, 3), cpu).skip(offset)
        assert torch.equal(torch.cat([noise.int32(3), noise.int32(110)]), whole[offset:offset + 113]), offset
    assert not torch.equal(Noise((1, 2, 4), cpu).int32(1001), whole)


def test_the_gate_noise_is_numpys_float32_stream_bit_for_bit_however_it_is_split():
    """`Noise.uniform_` builds float32 uniforms from raw words (faster than numpy's `random`): the values
    must be exactly numpy's, so every run's gate noise is what it was, and blocks must not matter."""
    import numpy as np

    from diffprune.noise import Noise

    key = (11, 3)
    ref = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key))).random(5003, dtype=np.float32)
    for splits in ([5003], [1, 5002], [2047, 3, 2953], [1 << 12, 907]):
        noise = Noise(key, "cpu")
        got = torch.cat([noise.uniform_(torch.empty(k)) for k in splits])
        assert np.array_equal(got.numpy(), ref), splits
    assert 0.0 <= float(got.min()) and float(got.max()) < 1.0
    g64 = Noise(key, "cpu").uniform_(torch.empty(100, dtype=torch.float64))  # float64: numpy's own recipe
    assert np.array_equal(g64.numpy(), np.random.Generator(np.random.PCG64(np.random.SeedSequence(key))).random(100))


def test_the_cpu_rounding_in_numpy_equals_the_torch_ops_it_replaced_bit_for_bit():
    """On the CPU `stochastic_round_` adds the random bits in numpy and shifts bf16's bits out (two passes);
    elsewhere it uses torch ops. Both must round every value, of either sign, the same way."""
    import numpy as np

    from diffprune.noise import Noise
    from diffprune.optim import _halves

    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(50_000, generator=g) * 10.0 ** torch.randint(-8, 8, (50_000,), generator=g),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-40, -1e-40])])
    low, high = _halves(Noise((4, 2), "cpu"), x.numel())
    assert isinstance(low, np.ndarray) and low.dtype == np.uint16
    words = Noise((4, 2), "cpu").int32(x.numel())
    for ours_bits, torch_bits in ((low, words & 0xFFFF), (high, words.bitwise_right_shift(16).bitwise_and_(0xFFFF))):
        ours, ref = torch.empty(x.shape, dtype=torch.bfloat16), torch.empty(x.shape, dtype=torch.bfloat16)
        stochastic_round_(ours, x.clone(), ours_bits)
        stochastic_round_(ref, x.clone(), torch_bits)
        assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))


def test_small_tensors_stepped_in_packs_equal_the_per_tensor_step_bit_for_bit(monkeypatch):
    """Small bf16 tensors (a gate's candidates in a bias) are stepped together in packs; bf16 parameters
    and all moments come out bit for bit as when each tensor is stepped alone (fp32 parameters with bf16
    moments to the last bit of torch's fused kernel), with tensors above the pack size,
    packs that overflow a chunk, an fp32 group with bf16 moments, and a tensor that skips a step (so the
    tensors' step counts differ)."""
    from diffprune import optim

    pack = optim._PACK_MAX

    def build():
        g = torch.Generator().manual_seed(0)
        sizes = [1, 7, 20, 300, 5000, pack, pack + 1, 30_000, 30_000, 30_000, pack, 3]  # > one chunk
        bf16 = [torch.nn.Parameter((torch.randn(n, generator=g) + 5).bfloat16()) for n in sizes]
        fp32 = [torch.nn.Parameter(torch.randn(n, generator=g) * 1e-3) for n in (5, 900)]
        opt = AdamW([{"params": bf16, "lr": 0.1}, {"params": fp32, "lr": 1e-3, "state_dtype": "bf16"}],
                    weight_decay=0.0, seed=3)
        return bf16 + fp32, opt

    def run(pack_max):
        monkeypatch.setattr(optim, "_PACK_MAX", pack_max)
        params, opt = build()
        for step in range(3):
            for i, p in enumerate(params):
                skip = step == 1 and i == 2
                p.grad = None if skip else torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i)).to(p.dtype)
            opt.step()
        return params, opt

    packed, opt_packed = run(pack)
    alone, opt_alone = run(0)
    assert [float(opt_packed.state[p]["step"]) for p in packed][:3] == [3.0, 3.0, 2.0]
    for a, b in zip(packed, alone):
        assert not torch.equal(a, a.detach().round())  # moved
        if a.dtype == torch.bfloat16:
            assert torch.equal(a, b)
        else:  # fp32: torch's fused kernel rounds its vectorised body and its scalar tail differently
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_packed.state[a][k], opt_alone.state[b][k])


def test_the_chunk_size_changes_the_speed_only_on_the_cpu(monkeypatch):
    """The bf16 step and the stochastic sum run chunk by chunk (2^17 entries on the CPU, 2^22 on accelerators,
    where each chunk's ops are kernel launches): on the CPU the results are bit for bit the same with another,
    ragged chunk size, because an entry's random bits depend on its position only."""
    from diffprune import blocks

    assert blocks.size(torch.device("cpu")) == blocks.CPU_BLOCK
    assert blocks.size(torch.device("cuda")) == blocks.DEVICE_BLOCK > blocks.CPU_BLOCK
    assert blocks.size("cpu", 5) == 5 and blocks.size("cpu", 0) == 1

    def run(chunk):
        monkeypatch.setattr(blocks, "CPU_BLOCK", chunk)
        g = torch.Generator().manual_seed(1)
        n = 2 * (1 << 17) + 12_345  # three default chunks, the last ragged
        alpha = torch.nn.Parameter((torch.randn(n, generator=g) + 5).bfloat16())
        w = torch.nn.Parameter(torch.randn(n, generator=g) * 1e-3)
        opt = AdamW([{"params": [alpha], "lr": 0.1}, {"params": [w], "lr": 1e-3, "state_dtype": "bf16"}],
                    weight_decay=0.01, seed=5)
        for step in range(2):
            alpha.grad = torch.randn(n, generator=g).bfloat16()
            w.grad = torch.randn(n, generator=g)
            opt.step()
        acc = torch.zeros(n, dtype=torch.bfloat16)
        add_stochastic_(acc, torch.rand(n, generator=g) * 1e-3, key=(7, 0))
        return [alpha, w, acc] + [opt.state[p][k] for p in (alpha, w) for k in ("exp_avg", "exp_avg_sq")]

    default, ragged = run(blocks.CPU_BLOCK), run(9_999)
    # bf16 alpha, its moments and the stochastic sum: bit for bit
    for i in (0, 2, 3, 4):
        assert torch.equal(default[i].detach().view(torch.int16), ragged[i].detach().view(torch.int16))
    assert not torch.equal(default[0].detach(), default[0].detach().round())  # the step moved alpha
    # fp32 w goes through torch's fused kernel, whose vectorised body and scalar tail may differ in the last
    # bit (a ragged chunk moves entries between them); its bf16 moments round what that kernel gives
    w, w2 = default[1].detach(), ragged[1].detach()
    torch.testing.assert_close(w2, w, rtol=2.5e-7, atol=0.0)
    for m, m2 in zip(default[5:], ragged[5:]):
        differ = (m != m2).sum().item()
        assert differ <= m.numel() // 1000
        torch.testing.assert_close(m2.float(), m.float(), rtol=2 ** -7, atol=0.0)
