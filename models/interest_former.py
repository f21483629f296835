"""The multimodal interest Transformer.

An item is its ID embedding, a text encoder over its title/description tokens and an image encoder
over its picture, projected to `d_model` and fused. A user is a causal Transformer over the
sequence of their items' representations plus event-type and position embeddings; the output at
position t is the user's interest after t events and scores the item at t+1.

Long- and short-term interest (`interest`): the short-term interest is the causal Transformer's
output, each position attending to the last `short_term_events` events only (the current
session); the long-term interest is one attention read over every event of the window (up to
thousands), queried by the short-term interest, so the session decides which older interests
count now. `gated` mixes the two per user and position with a learned sigmoid gate over both
vectors, so one vector still scores the whole catalogue (one dot product per item: chunked full
ranking and serving stay as they are). Multiple interest vectors with max-scoring would multiply
that cost by the number of vectors. docs/interest.md has the ablation.

Each content encoder trains in one of three modes: `frozen` (its features are computed once per
run for the whole catalogue and looked up, so training costs no encoder passes), `top` (only its
top layers train) or `full` (end to end); trainable encoders may have learning rates of their own.

Training uses a sampled softmax: the candidates of a batch are all unique items the batch holds
(every user's history and targets, i.e. in-batch negatives, plus the uniformly sampled negatives
the data pipeline adds). Each unique item is encoded exactly once per step, however often it
appears. Scores are cosine similarities divided by a temperature.

For scale: item IDs may be hashed into a fixed number of embedding rows (`item_id_buckets`),
and the ID table may be split by rows across data-parallel workers (`ShardedEmbedding`, in
models/sharded_table.py); a batch without padding attends causally without any mask (the flash
kernel on a GPU; no (T, T) mask in memory), and `activation_checkpointing` recomputes each block
in the backward pass, so histories of thousands of events fit.

Imports nothing of Ray, DeepSpeed or MLflow: the model runs the same in a notebook.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from interestformer.errors import ConfigError
from interestformer.models.encoders import (
    EncoderConfig, ImageEncoderConfig, TextEncoderConfig, build_image_encoder, build_text_encoder,
)
from interestformer.models.sharded_table import ShardedEmbedding


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
    item_id_dropout: float = 0.0
    """Chance, per training step and item, that an item's ID embedding is replaced by zeros, so that
    the model also learns to represent items by their content alone. An item that never occurs in
    training keeps a zero ID row (the table then starts at zero, and a model started from an earlier
    one gives its new items zero rows), so it is represented exactly as the dropout trained for. Needs
    use_item_id and a text or image encoder."""
    item_id_buckets: int = 0
    """0: one ID embedding row per catalogue item. N > 0: N rows shared by hashing, for catalogues
    too large (or too changeable) for a row each: an item's row is a stable hash of its raw item
    id modulo N (datasets.pipeline.id_buckets), so it keeps its row across catalogue versions;
    items whose hashes collide share a row."""
    cold_item_neighbours: int = 0
    """0: off. k > 0: wherever the model ranks (validation, test, jobs.evaluate, serving), an item
    that no training step reached (new to the catalogue, or held out by data.cold_item_fraction)
    takes as its ID embedding a mix of the ID embeddings of the k trained items nearest to it by
    the model's own projection of their frozen text and image features (cosine), weighted by a
    softmax at cold_item_temperature. Otherwise its row stays at its initial value, which places it
    by chance. Training itself is unchanged. Each evaluation copy compares every untrained item with
    every trained one (untrained x trained x d_model multiply-adds). Needs use_item_id, a row per
    item (item_id_buckets 0) and a frozen text or image encoder."""
    cold_item_temperature: float = 0.02
    """Softmax temperature over the cosines of the cold_item_neighbours: lower weighs the nearest more."""
    activation_checkpointing: bool = False
    """Recompute each Transformer block's activations in the backward pass instead of keeping
    them: less memory for long sequences, about a third more compute."""
    temperature: float = 0.05
    """Softmax temperature over cosine scores."""
    interest: Literal["short", "long", "gated"] = "gated"
    """What a user vector is: short, the causal Transformer over the last short_term_events events;
    long, one attention read over every event in the window (data.max_seq_len, up to thousands) by a
    learned query; gated, both, the long-term read queried by the short-term interest, mixed by a
    learned gate (per user, position and dimension)."""
    short_term_events: int = 20
    """Events the short-term Transformer attends to at each position (itself and the ones before);
    0: the whole window."""
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Item text encoder."""
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    """Item image encoder."""

    def frozen_encoders(self) -> dict[str, EncoderConfig]:
        """The enabled encoders whose train_mode is frozen, by kind ("text", "image")."""
        encoders = {"text": self.text, "image": self.image}
        return {kind: enc for kind, enc in encoders.items() if enc.enabled and enc.train_mode == "frozen"}

    def live_content(self) -> tuple[bool, bool]:
        """(text, image): whether batches must carry items' raw tokens and pixels, because that
        encoder runs in every step; a frozen encoder's features are looked up instead."""
        frozen = self.frozen_encoders()
        return (self.text.enabled and "text" not in frozen, self.image.enabled and "image" not in frozen)

    def __post_init__(self):
        for key in ("d_model", "n_layers", "n_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ConfigError("n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}")
        if not (self.use_item_id or self.text.enabled or self.image.enabled):
            raise ConfigError("use_item_id", "an item needs at least one of: item ID, text, image")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be within [0, 1), got {self.dropout}")
        if not 0.0 <= self.item_id_dropout < 1.0:
            raise ConfigError("item_id_dropout", f"must be within [0, 1), got {self.item_id_dropout}")
        if self.item_id_dropout and not (self.use_item_id and (self.text.enabled or self.image.enabled)):
            raise ConfigError("item_id_dropout", "drops the ID part of items: needs use_item_id true and text or "
                                                 "image enabled")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if self.short_term_events < 0:
            raise ConfigError("short_term_events", f"must be >= 0, got {self.short_term_events}")
        if self.item_id_buckets < 0:
            raise ConfigError("item_id_buckets", f"must be >= 0, got {self.item_id_buckets}")
        if self.item_id_buckets and not self.use_item_id:
            raise ConfigError("item_id_buckets", "hashes item IDs into embedding rows: needs use_item_id true")
        if self.cold_item_neighbours < 0:
            raise ConfigError("cold_item_neighbours", f"must be >= 0, got {self.cold_item_neighbours}")
        if self.cold_item_neighbours and not (self.use_item_id and not self.item_id_buckets and self.frozen_encoders()):
            raise ConfigError("cold_item_neighbours", "gives untrained items their content neighbours' ID rows: needs "
                                                      "use_item_id true, item_id_buckets 0 and a frozen text or image "
                                                      "encoder")
        if self.cold_item_temperature <= 0:
            raise ConfigError("cold_item_temperature", f"must be > 0, got {self.cold_item_temperature}")


@dataclass
class DataSpec:
    """What the model needs to know about the prepared data (from its metadata, not the config)."""

    num_items: int  # item indices are 1..num_items; 0 is padding
    num_event_types: int  # event-type indices are 1..num_event_types; 0 is padding
    max_seq_len: int
    text_vocab_size: int
    text_max_tokens: int
    image_size: int
    text_feature_dim: int = 0  # width of precomputed features of a frozen text encoder
    image_feature_dim: int = 0  # width of precomputed features of a frozen image encoder


def projection(kind: str, width: int, d: int) -> nn.Module:
    """An encoder's output (width) -> d_model, as EncoderConfig.projection says."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    return nn.Linear(width, d)


class ItemEncoder(nn.Module):
    """Item index + content -> one vector of size d_model.

    A frozen encoder is not held at all: its features for the whole catalogue live in buffers
    (`text_features`, `image_features`, `has_image`), filled by `load_content_features` before
    training and saved with the weights, so a checkpoint evaluates without the encoder. Hashed
    item IDs (item_id_buckets > 0) likewise keep each item's embedding row in a buffer
    (`id_bucket`), filled by `load_id_buckets`, and with cold_item_neighbours which items training
    reached is a buffer (`id_trained`), filled by `load_trained_items`."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec):
        super().__init__()
        d, rows = cfg.d_model, spec.num_items + 1
        parts = 0
        self.id_embedding = None
        self.id_dropout = cfg.item_id_dropout
        # Hashed IDs: item index -> embedding row; -1 until load_id_buckets, so that an unfilled map
        # fails the lookup instead of quietly reading the padding row.
        hashed = cfg.item_id_buckets > 0  # validated: only with use_item_id
        self.register_buffer("id_bucket", torch.full((rows,), -1, dtype=torch.long) if hashed else None)
        if cfg.use_item_id:
            self.id_embedding = nn.Embedding(cfg.item_id_buckets + 1 if hashed else rows, d, padding_idx=0)
            # With ID dropout, zero is what "no ID" means: rows that no training step reaches stay at it.
            if cfg.item_id_dropout:
                nn.init.zeros_(self.id_embedding.weight)
            else:
                nn.init.normal_(self.id_embedding.weight, std=0.02)
            parts += 1
        self.neighbours, self.neighbour_temperature = cfg.cold_item_neighbours, cfg.cold_item_temperature
        self.register_buffer("id_trained", torch.ones(rows, dtype=torch.bool) if cfg.cold_item_neighbours else None)
        self.text_encoder = self.text_proj = None
        if cfg.text.enabled:
            if cfg.text.train_mode == "frozen":
                self.register_buffer("text_features", torch.zeros(rows, spec.text_feature_dim))
                width = spec.text_feature_dim
            else:
                self.text_encoder = build_text_encoder(cfg.text, spec.text_vocab_size, spec.text_max_tokens)
                width = self.text_encoder.width
            self.text_proj = projection(cfg.text.projection, width, d)
            parts += 1
        self.image_encoder = self.image_proj = None
        if cfg.image.enabled:
            if cfg.image.train_mode == "frozen":
                self.register_buffer("image_features", torch.zeros(rows, spec.image_feature_dim))
                self.register_buffer("has_image", torch.zeros(rows, dtype=torch.bool))
                width = spec.image_feature_dim
            else:
                self.image_encoder = build_image_encoder(cfg.image, spec.image_size)
                width = self.image_encoder.width
            self.image_proj = projection(cfg.image.projection, width, d)
            self.missing_image = nn.Parameter(torch.zeros(d))
            parts += 1
        self.fuse = nn.Sequential(nn.Linear(parts * d, d), nn.LayerNorm(d))

    def forward(self, items: torch.Tensor, content: dict) -> torch.Tensor:
        """items (U,) unique item indices; content holds the live encoders' inputs in the same
        order: text_tokens (U, L), text_mask (U, L), pixels (U, 3, S, S) uint8, has_image (U,)."""
        parts = []
        if self.id_embedding is not None:
            ids = self.id_embedding(items if self.id_bucket is None else self.id_bucket[items])  # (U, d)
            if self.training and self.id_dropout:
                # One draw per unique item: an item loses its ID alike as a candidate and in histories.
                ids = ids * (torch.rand(len(items), 1, device=ids.device) >= self.id_dropout)
            parts.append(ids.to(self.fuse[0].weight.dtype))  # a sharded table stays fp32 under bf16
        if self.text_proj is not None:
            if self.text_encoder is None:
                features = self.text_features[items]
            else:
                features = self.text_encoder(content["text_tokens"], content["text_mask"])
            parts.append(self.text_proj(features.to(self.fuse[0].weight.dtype)))
        if self.image_proj is not None:
            if self.image_encoder is None:
                parts.append(self._project_images(self.image_features[items], self.has_image[items]))
            else:
                parts.append(self._encode_images(content["pixels"], content["has_image"]))
        return self.fuse(torch.cat(parts, dim=-1))

    def _project_images(self, features: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        dtype = self.fuse[0].weight.dtype
        projected = self.image_proj(features.to(dtype))
        return torch.where(has_image[:, None], projected, self.missing_image.to(dtype))

    def _encode_images(self, pixels: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        dtype = self.fuse[0].weight.dtype
        out = self.missing_image.to(dtype).expand(pixels.shape[0], -1).clone()  # (U, d)
        if has_image.any():
            out[has_image] = self.image_proj(self.image_encoder(pixels[has_image]).to(dtype))
        return out

    @torch.no_grad()
    def load_content_features(self, features: dict[str, torch.Tensor]):
        """Fills the frozen encoders' buffers from precomputed catalogue features: text_features
        (N+1, w), image_features (N+1, w) and has_image (N+1,), indexed by item index."""
        for name, tensor in features.items():
            if hasattr(self, name):
                getattr(self, name).copy_(tensor)

    @torch.no_grad()
    def shard_id_table(self, adamw: dict, grad_clip: float, device: torch.device | str = "cpu"):
        """Splits the ID table by rows across the ranks of the default process group
        (train.shard_item_table): each rank keeps its rows, on `device`, and steps them with an
        AdamW of these arguments (ShardedEmbedding). Every rank must call it, once the whole
        table's weights are in place."""
        if self.id_embedding is not None:
            self.id_embedding = ShardedEmbedding(self.id_embedding.weight, self.id_embedding.padding_idx, adamw,
                                                 grad_clip, device)

    @torch.no_grad()
    def load_trained_items(self, trained: torch.Tensor):
        """Fills which items training reaches (cold_item_neighbours): trained (N+1,) bool, by item index."""
        self.id_trained.copy_(trained)

    @torch.no_grad()
    def fill_untrained_ids(self):
        """Gives every item that training did not reach the ID row that cold_item_neighbours
        describes; trained rows are left as they are. For evaluation copies of a trained model (a
        no-op without cold_item_neighbours): the untrained rows' own values are overwritten."""
        if self.id_trained is None:
            return
        untrained = torch.nonzero(~self.id_trained[1:]).squeeze(1) + 1
        trained = torch.nonzero(self.id_trained[1:]).squeeze(1) + 1
        if not len(untrained) or not len(trained):
            return
        table, keys = self.id_embedding.weight, self._content_keys(trained)  # keys (T, c)
        k = min(self.neighbours, len(trained))
        chunk = max(1, 2**24 // len(trained))  # (chunk, T) cosines at a time: bounded memory on large catalogues
        for start in range(0, len(untrained), chunk):
            rows = untrained[start:start + chunk]
            nearest = (self._content_keys(rows) @ keys.T).topk(k, dim=-1)
            weights = torch.softmax(nearest.values / self.neighbour_temperature, dim=-1)  # (chunk, k)
            table[rows] = (weights.unsqueeze(-1) * table[trained[nearest.indices]]).sum(1).to(table.dtype)

    def _content_keys(self, items: torch.Tensor) -> torch.Tensor:
        """Items (M,) -> (M, c) unit vectors of their projected frozen content, each enabled part
        normalised alike, to find content neighbours by cosine."""
        dtype, parts = self.fuse[0].weight.dtype, []
        if self.text_proj is not None and self.text_encoder is None:
            parts.append(self.text_proj(self.text_features[items].to(dtype)))
        if self.image_proj is not None and self.image_encoder is None:
            parts.append(self._project_images(self.image_features[items], self.has_image[items]))
        return F.normalize(torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1), dim=-1)

    @torch.no_grad()
    def load_id_buckets(self, id_bucket: torch.Tensor):
        """Fills the hashed-ID map: id_bucket (N+1,) is each item index's embedding row, 0 for padding
        (datasets.pipeline.id_buckets)."""
        self.id_bucket.copy_(id_bucket)


class CausalBlock(nn.Module):
    """Pre-norm Transformer block; attention through PyTorch's scaled_dot_product_attention.

    Without a mask the attention is plain causal (`is_causal`), which lets a GPU take the flash
    kernel and never builds a (T, T) mask; a mask is passed only for batches with padding."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, d); attn_mask (B, 1, T, T) or (T, T) bool (True: may attend), or None for causal."""
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(  # (B, nh, T, hs)
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp(self.ln2(x))


class InterestFormer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: DataSpec, with_item_encoder: bool = True):
        """with_item_encoder=False builds the user Transformer alone: enough to serve from item
        representations computed beforehand (encode_users), without any content encoder."""
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        d = cfg.d_model
        self.item_encoder = ItemEncoder(cfg, spec) if with_item_encoder else None
        self.position = nn.Embedding(spec.max_seq_len, d)
        self.event_type = nn.Embedding(spec.num_event_types + 1, d, padding_idx=0)
        # Small, so that position and event type season the item representation, not drown it.
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.normal_(self.event_type.weight, std=0.02)
        self.dropout = nn.Dropout(cfg.dropout)
        short, long = cfg.interest in ("short", "gated"), cfg.interest in ("long", "gated")
        self.blocks = nn.ModuleList(CausalBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers if short else 0))
        self.ln_f = nn.LayerNorm(d) if short else None
        self.long_term = LongTermInterest(d, cfg.n_heads, cfg.dropout, queried=short) if long else None
        self.gate = nn.Linear(2 * d, d) if cfg.interest == "gated" else None

    # Tensors with a row per catalogue item (index 0: padding). The frozen encoders' features, the
    # hashed-ID map and which items train are filled from the catalogue each run; the ID table is
    # what training learns.
    CATALOGUE_BUFFERS = ("item_encoder.text_features", "item_encoder.image_features", "item_encoder.has_image",
                         "item_encoder.id_bucket", "item_encoder.id_trained")
    ID_TABLE = "item_encoder.id_embedding.weight"

    @torch.no_grad()
    def load_earlier(self, weights: dict[str, torch.Tensor], earlier_rows: torch.Tensor):
        """Starts from an earlier model's weights on a catalogue that may have changed since.
        earlier_rows (num_items + 1,) int64 is each of this catalogue's item indices' row in the
        earlier one, -1 for an item it did not have. Trained ID rows are copied bit for bit; a new
        item's row is zero, so it is represented by its content until it trains (hashed IDs keep
        their table: an item's row depends on its id alone). The catalogue's buffers are not
        read: they are this run's (load_content_features, load_id_buckets, load_trained_items),
        except that a carried row counts as trained (cold_item_neighbours) when the earlier model
        trained it, or did not record which it trained, whether or not this run's data reaches it."""
        hashed = self.item_encoder.id_bucket is not None
        if self.item_encoder.id_trained is not None:
            carried = earlier_rows > 0
            earlier_trained = weights.get("item_encoder.id_trained")
            self.item_encoder.id_trained[carried] |= (earlier_trained[earlier_rows[carried]] if earlier_trained is not None
                                                      else torch.ones(int(carried.sum()), dtype=torch.bool))
        own = self.state_dict()
        for name, tensor in weights.items():
            if name in self.CATALOGUE_BUFFERS:
                continue
            if name == self.ID_TABLE and not hashed:
                table = torch.zeros_like(own[name])
                known = earlier_rows >= 0
                table[known] = tensor[earlier_rows[known]].to(table.dtype)
                tensor = table
            if own[name].shape != tensor.shape:  # e.g. another vocabulary of event types or tokens
                raise ValueError(f"{name} is {tuple(tensor.shape)} in the earlier model, {tuple(own[name].shape)} here")
            own[name].copy_(tensor)

    def param_groups(self, lr: float) -> list[dict]:
        """Trainable parameters as optimizer groups: everything at `lr`, except encoders that
        have a learning rate of their own."""
        groups, rest = [], {id(p): p for p in self.parameters() if p.requires_grad}
        for encoder, encoder_cfg in ((self.item_encoder.text_encoder, self.cfg.text),
                                     (self.item_encoder.image_encoder, self.cfg.image)):
            params = [p for p in encoder.parameters() if p.requires_grad] if encoder is not None else []
            if params and encoder_cfg.lr:
                groups.append({"params": params, "lr": encoder_cfg.lr})
                for p in params:
                    del rest[id(p)]
        return [{"params": list(rest.values()), "lr": lr}] + groups

    def encode_items(self, items: torch.Tensor, content: dict) -> torch.Tensor:
        """(U,) unique item indices and their content -> (U, d) item representations (layer-
        normalised; L2-normalise them for scoring)."""
        return self.item_encoder(items, content)

    def encode_users(self, history_vectors: torch.Tensor, history: torch.Tensor, event_types: torch.Tensor):
        """history_vectors (B, T, d) item representations of the left-padded history (B, T) ->
        (B, T, d) L2-normalised interest after each event. Position t sees events 0..t only."""
        is_real = history > 0  # (B, T); histories are left-padded with 0
        events = history_vectors * is_real.unsqueeze(-1) + self.event_type(event_types)
        short = self._short_term(events, is_real) if self.blocks else None
        long = self.long_term(self.dropout(events), is_real, short) if self.long_term is not None else None
        if self.gate is None:
            return F.normalize(short if long is None else long, dim=-1)
        gate = torch.sigmoid(self.gate(torch.cat([short, long], dim=-1)))
        return F.normalize(gate * short + (1 - gate) * long, dim=-1)

    def _short_term(self, events: torch.Tensor, is_real: torch.Tensor) -> torch.Tensor:
        """The causal Transformer over the events (B, T, d), each position attending to the last
        short_term_events of them."""
        T = events.shape[1]
        # Positions count from the most recent event, so the newest is always the same embedding.
        positions = (T - 1 - torch.arange(T, device=events.device)).clamp(max=self.spec.max_seq_len - 1)
        x = self.dropout(events + self.position(positions))
        attn_mask = attention_mask(is_real, self.cfg.short_term_events)  # None: plain causal, no mask
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, attn_mask, use_reentrant=False)  # activations recomputed in backward
            else:
                x = block(x, attn_mask)
        return self.ln_f(x)

    def forward(self, batch: dict, teacher_logits: torch.Tensor | None = None,
                teacher_weight: float = 0.0) -> torch.Tensor:
        """Softmax next-item loss of a training batch (see datasets/pipeline.py for keys) over its
        candidates: sampled, or the whole catalogue (data.full_softmax). Distillation: with
        teacher_logits (other models' candidate_logits on the same batch), (1 - teacher_weight) x
        that loss + teacher_weight x the cross-entropy to the teachers' softmax."""
        logits, labels = self.candidate_logits(batch)
        loss = F.cross_entropy(logits.float(), labels)
        if teacher_logits is None:
            return loss
        to_teachers = F.cross_entropy(logits.float(), F.softmax(teacher_logits.float(), dim=-1))
        return (1.0 - teacher_weight) * loss + teacher_weight * to_teachers

    def candidate_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, U - 1) scores, over model.temperature, of every history position with a target
        against the batch's candidates, and (M,) each target's column."""
        items = batch["unique_items"]  # (U,) sorted, items[0] == 0 (padding); the batch's candidates
        vectors = self.encode_items(items, batch)  # (U, d)
        # Columns that are padding in every row change nothing (positions count from the newest
        # event), so they are not computed: batches of users with short histories cost less.
        keep = trailing_real_columns(batch["history"])
        history, targets, event_types = batch["history"][:, keep], batch["targets"][:, keep], batch["event_types"][:, keep]
        users = self.encode_users(vectors[torch.searchsorted(items, history)], history, event_types)
        has_target = targets > 0
        # Padding (items[0]) is never a candidate: scored against items[1:] only.
        logits = users[has_target] @ F.normalize(vectors[1:], dim=-1).T / self.cfg.temperature  # (M, U - 1)
        labels = torch.searchsorted(items, targets[has_target]) - 1  # (M,)
        return logits, labels

    def user_vectors(self, batch: dict) -> torch.Tensor:
        """Interest after the last event of each history: (B, d), for ranking."""
        items = batch["unique_items"]
        vectors = self.encode_items(items, batch)
        history = batch["history"]
        users = self.encode_users(vectors[torch.searchsorted(items, history)], history, batch["event_types"])
        return users[:, -1]


class LongTermInterest(nn.Module):
    """The long-term interest: at each position t, one attention read over every event 0..t of the
    window (up to data.max_seq_len, thousands; no positions: the history as a set), then an MLP.

    queried (gated): the query is the short-term interest, so the current session picks which of
    the user's older interests matter now, as DIN and SIM's search over long behaviour sequences
    do. Otherwise (long alone) the query is learned and the same for every user: a weighted mean
    of the history whose weights depend on each event's item and type.

    The values are the events themselves, not a projection of them: the read is a weighted mean of
    item representations, so it lies where the items it should rank lie from the first step. (On
    the demo, long alone with projected values reached NDCG@10 0.118; the first version, a mean of
    the events themselves with weights from each event alone, 0.138.)"""

    def __init__(self, d: int, n_heads: int, dropout: float, queried: bool):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.query = nn.Linear(d, d) if queried else nn.Parameter(0.02 * torch.randn(d))
        self.ln_events = nn.LayerNorm(d)
        self.key = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.ln = nn.LayerNorm(d)

    def forward(self, events: torch.Tensor, is_real: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """events (B, T, d), is_real (B, T), query (B, T, d) when queried -> (B, T, d)."""
        B, T, d = events.shape
        k = self.key(self.ln_events(events))
        q = self.query(query) if query is not None else self.query.to(k.dtype).expand(B, T, d)
        q, k, v = (t.reshape(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, events))
        attn_mask = attention_mask(is_real, 0)  # padding keys hidden; None: plain causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        pooled = y.transpose(1, 2).reshape(B, T, d)
        return self.ln(pooled + self.mlp(pooled))


def trailing_real_columns(history: torch.Tensor) -> slice:
    """The columns of a left-padded (B, T) batch from the first that holds an event in any row
    (at least the last column)."""
    real = (history > 0).any(dim=0)
    first = int(real.int().argmax()) if bool(real.any()) else history.shape[1] - 1
    return slice(first, None)


def attention_mask(is_real: torch.Tensor, window: int) -> torch.Tensor | None:
    """is_real (B, T) -> bool attention mask (True: may attend) for causal attention over the last
    `window` events (0: all), padding keys hidden: (B, 1, T, T) with padding, (T, T) without, or
    None when plain causal attention needs no mask at all (the flash kernel's case)."""
    T = is_real.shape[1]
    local = 0 < window < T
    padded = not bool(is_real.all())
    if not (local or padded):
        return None
    allowed = torch.ones(T, T, dtype=torch.bool, device=is_real.device).tril()  # (T, T)
    if local:
        allowed &= ~torch.ones_like(allowed).tril(-window)
    if not padded:
        return allowed
    # Every query may see itself, so rows of padding never softmax over nothing.
    allowed = (allowed & is_real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=is_real.device)
    return allowed.unsqueeze(1)
