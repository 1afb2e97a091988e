"""model.py: shapes and norms, config round-trip, masking and NaN safety, SDPA against plain attention, and a tiny
LAVA that drives lava_loss on a fixed batch to its minimum."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from losses import lava_loss
from model import SPACES, AudioConfig, Attention, LAVA, LAVAConfig, TextConfig, VideoConfig

PAD = 49


def tiny_config(width=32, depth=1, heads=4, center_tokens=False, frames_per_token=1):
    kw = dict(width=width, depth=depth, heads=heads)
    return LAVAConfig(video=VideoConfig(frames=4, grid=2, feature_dim=16, center_tokens=center_tokens, **kw),
                      audio=AudioConfig(frames=8, frames_per_token=frames_per_token, **kw),
                      text=TextConfig(vocab_size=50, pad_id=PAD, max_len=10, **kw), embed_dim=16)


def batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 4, 2, 2, 16, generator=g).relu()
    audio = torch.randn(B, 80, 8, generator=g)
    tokens = torch.randint(0, PAD, (B, 10), generator=g)
    tokens[:, 6:] = PAD                                                       # titles of 6 tokens, then padding
    return video, audio, tokens


def test_paper_defaults_and_config_round_trip():
    cfg = LAVAConfig()
    for sub in (cfg.video, cfg.audio, cfg.text):                              # Section 3: 4 layers, width 1024
        assert (sub.depth, sub.width, sub.heads, sub.mlp_ratio, sub.dropout) == (4, 1024, 16, 4.0, 0.0)
    assert (cfg.video.frames, cfg.audio.n_mels, cfg.audio.frames, cfg.text.max_len) == (16, 80, 256, 128)
    for c in (cfg, tiny_config(center_tokens=True, frames_per_token=2)):
        d = json.loads(json.dumps(c.to_dict()))                               # what a checkpoint stores
        assert LAVAConfig.from_dict(d) == c
    with pytest.raises(TypeError):
        LAVAConfig.from_dict({"video": {"widht": 8}})
    with pytest.raises(TypeError):  # keywords only: VideoConfig(512, 16, 7) must not set width, depth, heads
        VideoConfig(512, 16, 7)


def test_output_shapes_and_unit_norms():
    model = LAVA(tiny_config())
    video, audio, tokens = batch()
    out = model(video, audio, tokens)
    assert {s: set(d) for s, d in out.items()} == {s: set(ms) for s, ms in SPACES.items()}
    for d in out.values():
        for z in d.values():
            assert z.shape == (4, 16)
            assert torch.allclose(z.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert model.encode_video(video).shape == (4, 32)
    assert model.encode_audio(audio).shape == (4, 32)
    assert model.encode_text(tokens).shape == (4, 32)
    # the same head within a space: g_av(z_v) in "av" and g_vt(z_v) in "vt" differ, z_v itself is shared
    assert not torch.allclose(out["av"]["v"], out["vt"]["v"])
    assert torch.allclose(out["av"]["v"], F.normalize(model.heads["av"](model.encode_video(video)), dim=-1))


def test_only_needed_encoders_run():
    model = LAVA(tiny_config())
    calls = []
    for name in ("video_encoder", "audio_encoder", "text_encoder"):
        getattr(model, name).register_forward_hook(lambda mod, inp, out, name=name: calls.append(name))
    video, audio, tokens = batch()
    out = model(video, audio, None, spaces=("av",))
    assert sorted(calls) == ["audio_encoder", "video_encoder"] and set(out) == {"av"}
    calls.clear()
    model(video, None, tokens, spaces=("vt",))
    assert sorted(calls) == ["text_encoder", "video_encoder"]
    with pytest.raises(ValueError, match="'t'"):
        model(video, audio, None, spaces=("avt",))
    with pytest.raises(ValueError, match="unknown spaces"):
        model(video, audio, tokens, spaces=("at",))


def test_no_nan_for_all_padding_text_and_zero_inputs():
    model = LAVA(tiny_config())
    video, audio, tokens = batch()
    video[1] = 0
    audio[2] = 0
    tokens[3] = PAD                                                           # a missing title
    out = model(video, audio, tokens)
    assert all(torch.isfinite(z).all() for d in out.values() for z in d.values())
    assert torch.all(out["vt"]["t"][3] == 0)                                  # empty title -> zero embedding
    present = {"a": torch.tensor([1, 1, 0, 1]).bool(), "v": torch.ones(4, dtype=torch.bool),
               "t": torch.tensor([1, 1, 1, 0]).bool()}
    total, _ = lava_loss(out, present)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_text_padding_is_ignored():
    # The same titles padded to 6 or to 10 positions give the same z_t: padding is out of attention and pooling.
    model = LAVA(tiny_config())
    _, _, tokens = batch()
    assert torch.allclose(model.encode_text(tokens[:, :6]), model.encode_text(tokens), atol=1e-6)


def test_center_tokens_removes_a_per_clip_constant():
    model = LAVA(tiny_config(center_tokens=True))
    video, _, _ = batch()
    shifted = video + torch.randn(4, 1, 1, 1, 16)                             # one constant token per clip
    assert torch.allclose(model.encode_video(video), model.encode_video(shifted), atol=1e-5)
    plain = LAVA(tiny_config(center_tokens=False))
    assert not torch.allclose(plain.encode_video(video), plain.encode_video(shifted), atol=1e-3)


def test_audio_frames_per_token():
    model = LAVA(tiny_config(frames_per_token=2))
    assert model.audio_pos.shape == (4, 32)
    assert model.encode_audio(batch()[1]).shape == (4, 32)


def test_sdpa_equals_plain_softmax_attention():
    torch.manual_seed(0)
    attn = Attention(width=24, heads=3, dropout=0.0)
    x = torch.randn(3, 7, 24)
    keys = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 0]]).bool()
    got = attn(x, keys[:, None, None, :])
    # the textbook computation with the same weights
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(24, dim=-1)
    heads = lambda t: t.view(3, 7, 3, 8).transpose(1, 2)                      # (B, H, L, hd)
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)                           # (B, H, L, L)
    scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 7, 24)
    expected = y @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(attn(x), attn(x, torch.ones(3, 1, 1, 7, dtype=torch.bool)), atol=1e-6)


def test_init_weights_standard_deviations():
    model = LAVA(tiny_config(width=128))
    w = model.video_encoder.blocks[0].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 0.003 and w.abs().max() <= 0.04   # truncated normal, std 0.02, +-2 std
    assert abs(model.token_embedding.weight.std().item() - 0.02) < 0.004
    assert model.video_pos_t.std().item() > 0.01
    assert torch.all(model.video_encoder.blocks[0].attn.qkv.bias == 0)
    ln = model.text_encoder.ln_f
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


def test_widths_must_match_for_shared_heads():
    cfg = tiny_config()
    cfg.text.width = 64
    with pytest.raises(ValueError, match="one encoder width"):
        LAVA(cfg)


def test_tiny_model_drives_lava_loss_to_its_minimum():
    # Fixed batch of 8, all modalities present. The minimum of each of the 5 NCE terms (av, vt and 3 centroid
    # terms) over unit vectors is log(1 + 7 exp(-(8/7)/0.07)) = 5.7e-7 (a regular simplex, see losses.nce), so the
    # total's minimum is about 2.9e-6; at initialisation it is about 5 * ln 8 = 10.4. Adam at 1e-3 reaches about
    # 0.015 after 25 steps and 0.003 after 50; 80 steps must come within 0.01 of the minimum.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                      # tiny matrices: threads only contend on the shared 2-core machine
    try:
        _fit_fixed_batch()
    finally:
        torch.set_num_threads(threads)


def _fit_fixed_batch():
    torch.manual_seed(0)
    model = LAVA(tiny_config())
    video, audio, tokens = batch(B=8, seed=1)
    present = {m: torch.ones(8, dtype=torch.bool) for m in "avt"}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(80):
        total, terms = lava_loss(model(video, audio, tokens), present)
        if step == 0:
            assert total.item() > 5
        opt.zero_grad()
        total.backward()
        opt.step()
    minimum = 5 * math.log(1 + 7 * math.exp(-(8 / 7) / 0.07))
    assert total.item() < minimum + 0.01, total.item()
