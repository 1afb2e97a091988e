"""LAVA's three transformer encoders and the projection heads into its shared latent spaces.

    from model import LAVA, LAVAConfig
    model = LAVA(LAVAConfig())              # the paper's sizes (Section 3)
    emb = model(video, audio, tokens)       # {"av": {"a","v"}, "vt": {"v","t"}, "avt": {"a","v","t"}}: (B, embed_dim)
    z_v = model.encode_video(video)         # (B, width): what the linear probe reads

Paper, Section 2: encoders f_a, f_v, f_t produce embeddings z_a, z_v, z_t; projection functions g_{m,m'} map both
modalities of a pair into a shared space (g_av applies to z_a AND z_v, g_vt to z_v and z_t, g_avt to all three),
where the contrastive losses of losses.py compare dot products of the (here L2-normalised) projections.
Section 3: video = frozen ResNet-18 patch features per frame, audio = 80 x 256 log-mel "encoded by an MLP",
text = BPE tokens "mapped to embeddings"; each f_m is a transformer "with 4 layers and a hidden size of 1024".
What the paper leaves open is justified where it is chosen below: ViT/BERT blocks (16 heads, MLP ratio 4, no dropout,
GELU, pre-norm), masked mean pooling, learned positions, one bias-free head per space shared by its modalities.
"""
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# configs (defaults = the paper, Section 3, unless a comment says the paper is silent) ------------------------------


@dataclass(kw_only=True)  # keywords only: a positional value would land in another field
class EncoderConfig:
    """The transformer of every encoder f_m (Section 3); VideoConfig, AudioConfig and TextConfig add their inputs."""
    width: int = 1024          # Section 3: "hidden size of 1024"
    depth: int = 4             # Section 3: "4 layers"
    heads: int = 16            # paper silent: 64-dim heads, the BERT-large / ViT-L choice at width 1024
    mlp_ratio: float = 4.0     # paper silent: the standard transformer ratio
    dropout: float = 0.0       # paper silent: features are frozen and the data is 480k clips; no dropout


@dataclass(kw_only=True)
class VideoConfig(EncoderConfig):
    feature_dim: int = 512     # ResNet-18 layer4 channels (Section 3: frozen ImageNet ResNet-18 patch features)
    frames: int = 16           # Section 3: clips of 16 frames at 10 fps
    grid: int = 7              # 224 / 32: layer4 patch grid of a 224 x 224 frame
    center_tokens: bool = False  # kit option (not in the paper): subtract each clip's mean patch token, see notes


@dataclass(kw_only=True)
class AudioConfig(EncoderConfig):
    n_mels: int = 80           # Section 3: [80, 256] log-mel spectrograms
    frames: int = 256          # Section 3: 256 mel frames (10 ms hop -> 2.56 s)
    frames_per_token: int = 1  # kit option: 1 = the paper's MLP per mel frame; k > 1: k frames per token (CPU demo)
    mel_mean: float = 0.0      # paper silent: the log-mel is standardised with the mean and std of the training
    mel_std: float = 1.0       # clips' log-mel (prepare.py's audio_stats), as AST does with its dataset's statistics


@dataclass(kw_only=True)
class TextConfig(EncoderConfig):
    vocab_size: int = 48000    # Section 3: "48k vocab size using BPE"; set to the tokenizer's actual size
    max_len: int = 128         # Section 3: "maximum length of 128"
    pad_id: int = 47999        # prepare.py's BPETokenizer: pad_id = vocab_size - 1


@dataclass(kw_only=True)
class LAVAConfig:
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512       # d of the latent spaces; paper silent ("in some R^d"), 512 as in CLIP / VATT

    def to_dict(self):
        """Plain nested dict (JSON-able) for checkpoints: {"video": {...}, "audio": {...}, "text": {...}, ...}."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Inverse of `to_dict`. Missing keys take their defaults; unknown keys raise TypeError (a typo is a bug)."""
        subs = dict(video=VideoConfig, audio=AudioConfig, text=TextConfig)
        return cls(**{k: subs[k](**v) if k in subs else v for k, v in d.items()})


# The three latent spaces (Section 2, Eqs. 2-4) and the modalities projected into each.
SPACES = {"av": ("a", "v"), "vt": ("v", "t"), "avt": ("a", "v", "t")}

# transformer ----------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, on F.scaled_dot_product_attention."""

    def __init__(self, width, heads, dropout):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, attn_mask=None):
        # x: (B, L, D); attn_mask: None or bool (B, 1, 1, L), True = this key may be attended to
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads)     # (B, L, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # 3 x (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))            # y: (B, H, L, hd) -> (B, L, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); pre-norm trains stably without warm-up."""

    def __init__(self, width, heads, mlp_ratio, dropout):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None):
        x = x + self.drop(self.attn(self.ln1(x), attn_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class Encoder(nn.Module):
    """A stack of blocks, a final LayerNorm and masked mean pooling: tokens (B, L, D) -> embedding z (B, D).

    Mean over the valid (non-padding) tokens rather than a CLS token (the paper does not say which): no extra
    parameters, every token gets a direct gradient, and at random init it is a plain average of the input features,
    so the probe's random-init baseline is not handicapped by an untrained CLS query.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)

    def forward(self, x, valid=None):
        # x: (B, L, D) tokens with positions added; valid: None (all tokens real) or bool (B, L)
        attn_mask = None
        if valid is not None:
            # A row with no valid token at all (an all-padding title) would give every query only masked keys,
            # and SDPA returns NaN for such rows; let those rows attend everywhere instead (their pooled output
            # is zeroed below, so what they compute is irrelevant but finite). Tensor ops only: compile-friendly.
            keys = valid | ~valid.any(dim=1, keepdim=True)          # (B, L)
            attn_mask = keys[:, None, None, :]                      # (B, 1, 1, L), broadcast over heads and queries
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.ln_f(x)                                            # (B, L, D)
        if valid is None:
            return x.mean(dim=1)                                    # (B, D)
        w = valid.to(x.dtype).unsqueeze(-1)                         # (B, L, 1)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)     # (B, D); an all-padding row gives 0, not NaN


# LAVA -----------------------------------------------------------------------------------------------------------


class LAVA(nn.Module):
    """The three encoders f_v, f_a, f_t (Section 3) and the projection heads g_av, g_vt, g_avt (Section 2)."""

    def __init__(self, config: LAVAConfig):
        super().__init__()
        self.config = config
        cv, ca, ct = config.video, config.audio, config.text
        widths = {"video": cv.width, "audio": ca.width, "text": ct.width}
        if len(set(widths.values())) != 1:
            # g_av is ONE function applied to z_a and z_v (Eq. 2), so both must live in the same R^width.
            raise ValueError(f"the shared projection heads need one encoder width, got {widths}")
        width = cv.width

        # video: (B, T, G, G, F) patch features -> linear F -> width; learned factorised positions
        # (time + row + column, 16 + 7 + 7 vectors instead of 784 joint ones: each table is trained by every token
        # that shares its coordinate, which matters at the small data scale of the paper and of the demo).
        self.video_in = nn.Linear(cv.feature_dim, width)
        self.video_pos_t = nn.Parameter(torch.zeros(cv.frames, width))
        self.video_pos_h = nn.Parameter(torch.zeros(cv.grid, width))
        self.video_pos_w = nn.Parameter(torch.zeros(cv.grid, width))
        self.video_encoder = Encoder(cv)

        # audio: (B, 80, A) log-mel -> one token per mel frame (or per k frames) through a 2-layer MLP
        # ("audio features are encoded by an MLP", Section 3); learned positions over time.
        if ca.frames % ca.frames_per_token:
            raise ValueError(f"audio frames {ca.frames} not divisible by frames_per_token {ca.frames_per_token}")
        self.audio_in = nn.Sequential(nn.Linear(ca.n_mels * ca.frames_per_token, width), nn.GELU(),
                                      nn.Linear(width, width))
        self.audio_pos = nn.Parameter(torch.zeros(ca.frames // ca.frames_per_token, width))
        self.audio_encoder = Encoder(ca)

        # text: token embeddings + learned positions; padding (pad_id) is masked out of attention and pooling.
        self.token_embedding = nn.Embedding(ct.vocab_size, width)
        self.text_pos = nn.Parameter(torch.zeros(ct.max_len, width))
        self.text_encoder = Encoder(ct)

        # projection heads, one per latent space and shared by its modalities (g_av(z_a), g_av(z_v), ...). Bias-free:
        # the outputs are L2-normalised and compared by dot products; a bias would only add one vector to every output.
        self.heads = nn.ModuleDict({space: nn.Linear(width, config.embed_dim, bias=False) for space in SPACES})

        # Linear/Embedding weights and positions truncated normal, std 0.02 cut at +-2 std (BERT / ViT / GPT-2: the
        # residual stream starts near the input features), biases 0; LayerNorm keeps torch's identity init.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for p in (self.video_pos_t, self.video_pos_h, self.video_pos_w, self.audio_pos, self.text_pos):
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)

    def encode_video(self, video):
        """video: (B, T, G, G, F) float patch features (T <= cfg.frames, G <= cfg.grid) -> z_v (B, width)."""
        B, T, G, G2, Fd = video.shape
        x = video.reshape(B, T * G * G2, Fd).to(self.video_in.weight.dtype)       # (B, N, F), N = T*G*G
        if self.config.video.center_tokens:
            # Subtract each clip's mean patch token (over time and space): removes the clip's static appearance,
            # which contrastive learning otherwise memorises on frozen random-init features (notes). Label-free.
            x = x - x.mean(dim=1, keepdim=True)
        x = self.video_in(x)                                                       # (B, N, D)
        pos = (self.video_pos_t[:T, None, None] + self.video_pos_h[None, :G, None]
               + self.video_pos_w[None, None, :G2])                                # (T, G, G, D)
        return self.video_encoder(x + pos.reshape(T * G * G2, -1))

    def encode_audio(self, mel):
        """mel: (B, n_mels, A) log-mel (A <= cfg.frames, divisible by frames_per_token) -> z_a (B, width)."""
        B, M, A = mel.shape
        cfg = self.config.audio
        k = cfg.frames_per_token
        mel = (mel - cfg.mel_mean) / cfg.mel_std  # the same standardisation for pre-training and the probe
        x = mel.transpose(1, 2).reshape(B, A // k, k * M).to(self.audio_pos.dtype)  # (B, A/k, k*80): frame-major
        x = self.audio_in(x) + self.audio_pos[: A // k]                            # (B, A/k, D)
        return self.audio_encoder(x)

    def encode_text(self, tokens):
        """tokens: (B, L) int ids (L <= cfg.max_len) padded with pad_id -> z_t (B, width); all padding: 0, not NaN."""
        valid = tokens != self.config.text.pad_id                                  # (B, L)
        x = self.token_embedding(tokens.long()) + self.text_pos[:tokens.shape[1]]  # (B, L, D)
        return self.text_encoder(x, valid)

    def forward(self, video=None, audio=None, tokens=None, spaces=("av", "vt", "avt")):
        """{space: {modality: (B, embed_dim) L2-normalised}} for the requested `spaces` (keys of SPACES); only the
        encoders they need run, inputs they do not need may be None. A zero z (all-padding text) stays 0, not NaN."""
        unknown = set(spaces) - set(SPACES)
        if unknown:
            raise ValueError(f"unknown spaces {sorted(unknown)}; choose from {list(SPACES)}")
        needed = {m for space in spaces for m in SPACES[space]}
        z = {}
        # fixed order: a structural loop, not data-dependent (torch.compile traces it once)
        for m, x, encode in (("v", video, self.encode_video), ("a", audio, self.encode_audio),
                             ("t", tokens, self.encode_text)):
            if m in needed:
                if x is None:
                    raise ValueError(f"spaces {tuple(spaces)} need modality {m!r} but its input is None")
                z[m] = encode(x)                      # (B, width)
        return {space: {m: F.normalize(self.heads[space](z[m]), dim=-1) for m in SPACES[space]}
                for space in spaces}
