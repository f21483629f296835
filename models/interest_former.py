"""The multimodal interest Transformer.

An item is its ID embedding, a text encoder over its title/description tokens and an image encoder
over its picture, projected to `d_model` and fused. A user is a causal Transformer over the
sequence of their items' representations plus event-type and position embeddings; the output at
position t is the user's interest after t events and scores the item at t+1.

Training uses a sampled softmax: the candidates of a batch are all unique items the batch holds
(every user's history and targets, i.e. in-batch negatives, plus the uniformly sampled negatives
the data pipeline adds). Each unique item is encoded exactly once per step, however often it
appears. Scores are cosine similarities divided by a temperature.

Imports nothing of Ray, DeepSpeed or MLflow: the model runs the same in a notebook.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from interestformer import ConfigError


@dataclass
class TextEncoderConfig:
    """A Hugging Face transformers text encoder over each item's tokens."""

    enabled: bool = True
    """Encode item text. Off gives an ID (and image) only model."""
    pretrained_path: str = ""
    """Local folder holding a transformers model and tokenizer (e.g. all-MiniLM-L6-v2). Empty builds
    a small BERT from the sizes below, over a word-piece vocabulary trained on the catalogue."""
    hidden_size: int = 64
    """Width of the BERT built from config."""
    num_layers: int = 2
    """Layers of the BERT built from config."""
    num_heads: int = 2
    """Attention heads of the BERT built from config."""
    freeze: bool = False
    """Keep the encoder's weights fixed (its output projection still trains)."""


@dataclass
class ImageEncoderConfig:
    """A Hugging Face transformers vision encoder over each item's decoded image."""

    enabled: bool = True
    """Encode item images. Items without a usable image get a learned 'no image' vector."""
    pretrained_path: str = ""
    """Local folder holding a transformers vision model. Empty builds a small ViT from the sizes
    below."""
    hidden_size: int = 64
    """Width of the ViT built from config."""
    num_layers: int = 2
    """Layers of the ViT built from config."""
    num_heads: int = 2
    """Attention heads of the ViT built from config."""
    patch_size: int = 8
    """ViT patch size in pixels; must divide data.image_size."""
    freeze: bool = False
    """Keep the encoder's weights fixed (its output projection still trains)."""


@dataclass
class ModelConfig:
    """Sizes of the interest Transformer."""

    d_model: int = 64
    """Width of item representations and of the user Transformer."""
    n_layers: int = 2
    """Causal Transformer blocks over the behaviour sequence."""
    n_heads: int = 2
    """Attention heads per block; must divide d_model."""
    dropout: float = 0.1
    """Dropout in the user Transformer and on item representations."""
    use_item_id: bool = True
    """Learn an embedding per item ID. Off gives a content-only model that ranks unseen items."""
    temperature: float = 0.05
    """Softmax temperature over cosine scores."""
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Item text encoder."""
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    """Item image encoder."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ConfigError("n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}")
        if not (self.use_item_id or self.text.enabled or self.image.enabled):
            raise ConfigError("use_item_id", "an item needs at least one of: item ID, text, image")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be within [0, 1), got {self.dropout}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")


@dataclass
class DataSpec:
    """What the model needs to know about the prepared data (from its metadata, not the config)."""

    num_items: int  # item indices are 1..num_items; 0 is padding
    num_event_types: int  # event-type indices are 1..num_event_types; 0 is padding
    max_seq_len: int
    text_vocab_size: int
    text_max_tokens: int
    image_size: int


class ItemEncoder(nn.Module):
    """Item index + content -> one vector of size d_model."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec):
        super().__init__()
        d = cfg.d_model
        parts = 0
        self.id_embedding = None
        if cfg.use_item_id:
            self.id_embedding = nn.Embedding(spec.num_items + 1, d, padding_idx=0)
            nn.init.normal_(self.id_embedding.weight, std=0.02)
            parts += 1
        self.text_encoder = self.text_proj = None
        if cfg.text.enabled:
            self.text_encoder = build_text_encoder(cfg.text, spec)
            self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, d)
            _freeze(self.text_encoder, cfg.text.freeze)
            parts += 1
        self.image_encoder = self.image_proj = None
        if cfg.image.enabled:
            self.image_encoder = build_image_encoder(cfg.image, spec)
            self.image_proj = nn.Linear(_vision_width(self.image_encoder), d)
            self.missing_image = nn.Parameter(torch.zeros(d))
            _freeze(self.image_encoder, cfg.image.freeze)
            parts += 1
        self.fuse = nn.Sequential(nn.Linear(parts * d, d), nn.LayerNorm(d))

    def forward(self, items: torch.Tensor, content: dict) -> torch.Tensor:
        """items (U,) unique item indices; content holds their text tokens and images in the same
        order: text_tokens (U, L), text_mask (U, L), pixels (U, 3, S, S) uint8, has_image (U,)."""
        parts = []
        if self.id_embedding is not None:
            parts.append(self.id_embedding(items))  # (U, d)
        if self.text_encoder is not None:
            mask = content["text_mask"]
            hidden = self.text_encoder(
                input_ids=content["text_tokens"], attention_mask=mask
            ).last_hidden_state  # (U, L, h)
            mask = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # mean over real tokens
            parts.append(self.text_proj(pooled))
        if self.image_encoder is not None:
            parts.append(self._encode_images(content["pixels"], content["has_image"]))
        return self.fuse(torch.cat(parts, dim=-1))

    def _encode_images(self, pixels: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        dtype = self.image_proj.weight.dtype
        out = self.missing_image.to(dtype).expand(pixels.shape[0], -1).clone()  # (U, d)
        if has_image.any():
            x = pixels[has_image].to(dtype) / 127.5 - 1.0  # uint8 -> [-1, 1]
            features = _vision_features(self.image_encoder(pixel_values=x))
            out[has_image] = self.image_proj(features)
        return out


class CausalBlock(nn.Module):
    """Pre-norm Transformer block; attention through PyTorch's scaled_dot_product_attention."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(  # (B, nh, T, hs)
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.ln2(x))


class InterestFormer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: DataSpec):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        d = cfg.d_model
        self.item_encoder = ItemEncoder(cfg, spec)
        self.position = nn.Embedding(spec.max_seq_len, d)
        self.event_type = nn.Embedding(spec.num_event_types + 1, d, padding_idx=0)
        # Small, so that position and event type season the item representation, not drown it.
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.normal_(self.event_type.weight, std=0.02)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(CausalBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)

    def encode_items(self, items: torch.Tensor, content: dict) -> torch.Tensor:
        """(U,) unique item indices and their content -> (U, d) item representations (layer-
        normalised; L2-normalise them for scoring)."""
        return self.item_encoder(items, content)

    def encode_users(self, history_vectors: torch.Tensor, history: torch.Tensor, event_types: torch.Tensor):
        """history_vectors (B, T, d) item representations of the left-padded history (B, T) ->
        (B, T, d) L2-normalised interest after each event. Position t sees events 0..t only."""
        B, T = history.shape
        is_real = history > 0  # (B, T); histories are left-padded with 0
        # Positions count from the most recent event, so the newest is always the same embedding.
        positions = (T - 1 - torch.arange(T, device=history.device)).clamp(max=self.spec.max_seq_len - 1)
        x = history_vectors * is_real.unsqueeze(-1) + self.position(positions) + self.event_type(event_types)
        x = self.dropout(x)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
        # Every query may see itself, so rows of padding never softmax over nothing.
        attn_mask = (causal & is_real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)
        attn_mask = attn_mask.unsqueeze(1)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, attn_mask)
        return F.normalize(self.ln_f(x), dim=-1)

    def forward(self, batch: dict) -> torch.Tensor:
        """Sampled-softmax next-item loss of a training batch (see datasets/pipeline.py for keys)."""
        items = batch["unique_items"]  # (U,) sorted; the batch's candidates
        vectors = self.encode_items(items, batch)  # (U, d)
        history, targets = batch["history"], batch["targets"]  # (B, T) each
        users = self.encode_users(vectors[torch.searchsorted(items, history)], history, batch["event_types"])
        has_target = targets > 0
        logits = users[has_target] @ F.normalize(vectors, dim=-1).T / self.cfg.temperature  # (M, U)
        logits = logits.masked_fill(items == 0, float("-inf"))  # padding is never a candidate
        labels = torch.searchsorted(items, targets[has_target])  # (M,)
        return F.cross_entropy(logits.float(), labels)

    def user_vectors(self, batch: dict) -> torch.Tensor:
        """Interest after the last event of each history: (B, d), for ranking."""
        items = batch["unique_items"]
        vectors = self.encode_items(items, batch)
        history = batch["history"]
        users = self.encode_users(vectors[torch.searchsorted(items, history)], history, batch["event_types"])
        return users[:, -1]


def build_text_encoder(cfg: TextEncoderConfig, spec: DataSpec) -> nn.Module:
    from transformers import AutoModel, BertConfig, BertModel

    if cfg.pretrained_path:
        return AutoModel.from_pretrained(cfg.pretrained_path)
    return BertModel(
        BertConfig(
            vocab_size=spec.text_vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=4 * cfg.hidden_size,
            max_position_embeddings=max(spec.text_max_tokens, 8),
        ),
        add_pooling_layer=False,
    )


def build_image_encoder(cfg: ImageEncoderConfig, spec: DataSpec) -> nn.Module:
    from transformers import AutoModel, ViTConfig, ViTModel

    if cfg.pretrained_path:
        return AutoModel.from_pretrained(cfg.pretrained_path)
    return ViTModel(
        ViTConfig(
            image_size=spec.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=4 * cfg.hidden_size,
        ),
        add_pooling_layer=False,
    )


def _vision_width(encoder: nn.Module) -> int:
    config = encoder.config
    if hasattr(config, "hidden_sizes"):  # convolutional backbones (ConvNeXt, ResNet) report stages
        return config.hidden_sizes[-1]
    return config.hidden_size


def _vision_features(output) -> torch.Tensor:
    """One vector per image from a transformers vision model's output."""
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    hidden = output.last_hidden_state
    return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.mean(dim=(2, 3))


def _freeze(module: nn.Module, frozen: bool):
    for p in module.parameters():
        p.requires_grad_(not frozen)
