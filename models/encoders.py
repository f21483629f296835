"""The item content encoders: a text encoder over each item's tokens and an image encoder over its
picture, their configs (including how each trains, `train_mode`), and building them from config or
from local pretrained weights. ItemEncoder (models/interest_former.py) projects and fuses their
outputs with the item ID embedding.
"""

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from interestformer.errors import ConfigError

EncoderMode = Literal["auto", "frozen", "top", "full"]


@dataclass
class EncoderConfig:
    """A content encoder (text or image) and how it trains."""

    enabled: bool = True
    """Encode this kind of content. Off gives a model without it."""
    pretrained_path: str = ""
    """Local pretrained weights. Text: a folder holding a transformers model and tokenizer (e.g.
    all-MiniLM-L6-v2). Image: a transformers vision model folder, or an EfficientNet-Lite weights
    file named efficientnet-liteN-*.pth. `pkg:<python package>/<sub/path>` names a path inside an
    installed package. Empty builds a small encoder from the sizes below."""
    hidden_size: int = 64
    """Width of the encoder built from config."""
    num_layers: int = 2
    """Layers of the encoder built from config."""
    num_heads: int = 2
    """Attention heads of the encoder built from config."""
    train_mode: EncoderMode = "auto"
    """frozen: features computed once per run for the whole catalogue (fast: no encoder pass while
    training); top: only the top `trainable_layers` layers train; full: end to end. auto: frozen
    for a pretrained encoder, full for one built from config (random weights must learn)."""
    trainable_layers: int = 1
    """Top layers (Transformer layers, or EfficientNet blocks) that train when train_mode is top."""
    lr: float = 0.0
    """Peak learning rate of the encoder's own weights; 0 uses train.lr. Its output projection
    always trains at train.lr."""
    projection: Literal["linear", "mlp"] = "linear"
    """How the encoder's output becomes a d_model vector before fusion: linear, one linear layer;
    mlp, Linear(width, 4 d_model), GELU, Linear(4 d_model, d_model): a non-linear map, which frozen
    features otherwise never get."""

    def output_fields(self) -> dict:
        """The fields that decide what the encoder outputs, without those on how it trains and how
        its output is projected: what frozen features depend on."""
        return {name: value for name, value in vars(self).items() if name not in ("trainable_layers", "lr", "projection")}

    def __post_init__(self):
        if self.train_mode == "auto":
            self.train_mode = "frozen" if self.pretrained_path else "full"
        if self.trainable_layers < 1:
            raise ConfigError("trainable_layers", f"must be >= 1, got {self.trainable_layers}")
        if self.lr < 0:
            raise ConfigError("lr", f"must be >= 0, got {self.lr}")


@dataclass
class TextEncoderConfig(EncoderConfig):
    """A Hugging Face transformers text encoder over each item's tokens, mean-pooled."""


@dataclass
class ImageEncoderConfig(EncoderConfig):
    """An image encoder over each item's decoded picture; items without a usable image get a
    learned 'no image' vector."""

    patch_size: int = 8
    """ViT patch size in pixels (encoder built from config); must divide data.image_size."""


class TextEncoder(nn.Module):
    """A transformers text model, mean-pooled over real tokens: tokens (U, L) -> (U, width)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.width = model.config.hidden_size

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=tokens, attention_mask=mask).last_hidden_state  # (U, L, h)
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # an item without text gives 0

    def layers(self) -> list[nn.Module]:
        return layer_stack(self.model)


class ImageEncoder(nn.Module):
    """A vision backbone: pixels (U, 3, S, S) uint8 -> (U, width) pooled features.

    Pixels are scaled to [-1, 1], the input range of EfficientNet-Lite (and of the ViT built from
    config). Batch norms of layers that do not train stay in eval mode."""

    def __init__(self, backbone: nn.Module, width: int, layers: list[nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.width = width
        self._layers = layers

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(next(self.backbone.parameters()).dtype) / 127.5 - 1.0
        if hasattr(self.backbone, "extract_features"):  # EfficientNet: (U, C, h, w) feature map
            return self.backbone.extract_features(x).mean(dim=(2, 3))
        output = self.backbone(pixel_values=x)
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = output.last_hidden_state
        return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.mean(dim=(2, 3))

    def layers(self) -> list[nn.Module]:
        return self._layers

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():  # frozen batch norms must not update their statistics
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.weight.requires_grad:
                module.eval()
        return self


def build_text_encoder(cfg: TextEncoderConfig, vocab_size: int, max_tokens: int) -> TextEncoder:
    """vocab_size and max_tokens (the prepared data's) size an encoder built from config; a
    pretrained one brings its own."""
    from transformers import AutoModel, BertConfig, BertModel

    if cfg.pretrained_path:
        model = AutoModel.from_pretrained(cfg.pretrained_path)
    else:
        model = BertModel(BertConfig(vocab_size=vocab_size, max_position_embeddings=max(max_tokens, 8),
                                     **_transformer_sizes(cfg)), add_pooling_layer=False)
    return _set_trainable(TextEncoder(model), cfg)


EFFICIENTNET_LITE = re.compile(r"(efficientnet-lite\d)[^/]*\.pth$")


def build_image_encoder(cfg: ImageEncoderConfig, image_size: int) -> ImageEncoder:
    """image_size (data.image_size) sizes a ViT built from config; a pretrained backbone brings its own."""
    if EFFICIENTNET_LITE.search(cfg.pretrained_path):
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(EFFICIENTNET_LITE.search(cfg.pretrained_path).group(1))
        # weights_only: a weights file is data, never code to unpickle and run.
        net.load_state_dict(torch.load(cfg.pretrained_path, map_location="cpu", weights_only=True))
        del net._fc  # the ImageNet classifier; features come from the last convolution
        head = nn.ModuleList([net._conv_head, net._bn1])
        encoder = ImageEncoder(net, net._conv_head.out_channels, list(net._blocks) + [head])
    else:
        from transformers import AutoModel, ViTConfig, ViTModel

        if cfg.pretrained_path:
            model = AutoModel.from_pretrained(cfg.pretrained_path)
        else:
            model = ViTModel(ViTConfig(image_size=image_size, patch_size=cfg.patch_size, **_transformer_sizes(cfg)),
                             add_pooling_layer=False)
        config = model.config
        # Convolutional backbones (ConvNeXt, ResNet) report the widths of their stages.
        width = config.hidden_sizes[-1] if hasattr(config, "hidden_sizes") else config.hidden_size
        encoder = ImageEncoder(model, width, layer_stack(model))
    return _set_trainable(encoder, cfg)


def _transformer_sizes(cfg: EncoderConfig) -> dict:
    """The sizes of a transformers encoder built from config (BERT for text, ViT for images)."""
    return dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                intermediate_size=4 * cfg.hidden_size)


def layer_stack(model: nn.Module) -> list[nn.Module]:
    """A transformers model's stack of layers (BERT's encoder.layer, ViT's layers, ConvNeXt's
    stages...): its largest ModuleList, bottom first."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    largest = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=[])
    return list(largest)


def _set_trainable(encoder: nn.Module, cfg: EncoderConfig) -> nn.Module:
    """frozen: nothing trains; top: the top `trainable_layers` layers; full: everything."""
    for p in encoder.parameters():
        p.requires_grad_(cfg.train_mode == "full")
    if cfg.train_mode == "top":
        for layer in encoder.layers()[-cfg.trainable_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
    return encoder.train(encoder.training)
