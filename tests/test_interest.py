"""Long- and short-term interest, and incremental training on a grown catalogue (model and
checkpoint level; the job runs these paths in test_end_to_end and benchmarks/incremental.py)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interestformer.errors import ConfigError
from interestformer.jobs.config import JobConfig
from interestformer.jobs.distributed import (check_start_from, check_teacher_catalogues, check_teachers, start_from,
                                             write_weights_and_state)
from interestformer.models.encoders import ImageEncoderConfig, TextEncoderConfig
from interestformer.models.interest_former import DataSpec, InterestFormer, ModelConfig
from interestformer.models.ranking import RankTotals, evaluate_ensemble, evaluate_model, row_ranks

SPEC = DataSpec(num_items=32, num_event_types=1, max_seq_len=12, text_vocab_size=60, text_max_tokens=6, image_size=16)
SMALL = dict(d_model=16, n_layers=1, n_heads=2, dropout=0.0,
             text=TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2),
             image=ImageEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, patch_size=8))


def model_of(spec: DataSpec = SPEC, seed: int = 0, **overrides) -> InterestFormer:
    torch.manual_seed(seed)
    return InterestFormer(ModelConfig(**{**SMALL, **overrides}), spec).eval()


@pytest.mark.parametrize("interest", ["short", "long", "gated"])
def test_each_interest_is_causal_and_only_the_long_term_one_reads_beyond_the_short_window(interest):
    model = model_of(interest=interest, short_term_events=4)
    history = torch.arange(1, 13)[None]  # 12 events, no padding
    types = torch.ones_like(history)
    vectors = torch.randn(1, 12, 16)
    changed = vectors.clone()
    changed[0, 2] = torch.randn(16)  # an old event: more than 4 events before the last
    with torch.no_grad():
        before, after = model.encode_users(vectors, history, types), model.encode_users(changed, history, types)
    assert torch.equal(before[0, :2], after[0, :2])  # earlier positions never see later events
    moved = not torch.allclose(before[0, -1], after[0, -1], atol=1e-5)
    assert moved == (interest != "short")  # the short-term interest attends to the last 4 events only
    assert not torch.allclose(before[0, 3], after[0, 3], atol=1e-5)  # within the window it counts


def test_the_gated_long_term_read_is_queried_by_the_short_term_interest():
    model = model_of(interest="gated", short_term_events=4)
    seen = {}
    model.ln_f.register_forward_hook(lambda module, args, out: seen.update(short=out))  # hooks return None
    model.long_term.register_forward_pre_hook(lambda module, args: seen.update(query=args[2]))
    history = torch.arange(1, 13)[None]
    with torch.no_grad():
        model.encode_users(torch.randn(1, 12, 16), history, torch.ones_like(history))
    assert seen["query"] is seen["short"]
    assert model_of(interest="long").long_term.query.shape == (16,)  # alone: a learned query


def test_padding_never_reaches_the_long_term_interest():
    model = model_of(interest="long")
    vectors = torch.randn(1, 12, 16)
    padded = torch.tensor([[0] * 7 + [3, 4, 5, 6, 7]])
    garbage = vectors.clone()
    garbage[0, :7] = 100 * torch.randn(7, 16)  # whatever sits at padding positions
    with torch.no_grad():
        a = model.encode_users(vectors, padded, (padded > 0).long())[0, -1]
        b = model.encode_users(garbage, padded, (padded > 0).long())[0, -1]
    assert torch.allclose(a, b, atol=1e-6)


def catalogue(count: int, prefix: str = "item") -> list[str]:
    return sorted(f"{prefix}{i:03d}" for i in range(count))


def save_checkpoint(folder, model: InterestFormer, item_ids: list[str], cfg: JobConfig):
    folder.mkdir()
    write_weights_and_state(str(folder), model.state_dict(), {
        "epoch": 1, "step": 10, "config": cfg.to_dict(), "spec": dataclasses.asdict(model.spec),
        "prepared_path": str(folder / "prepared"), "world_size": 1}, item_ids)


def job_config(**model) -> JobConfig:
    cfg = JobConfig.from_dict({"model": {**{k: v for k, v in SMALL.items() if k not in ("text", "image")},
                                         "text": {"enabled": False}, "image": {"enabled": False}, **model},
                               "data": {"max_seq_len": SPEC.max_seq_len}})
    return cfg


def test_continuing_keeps_trained_id_rows_bit_identical_and_adds_zero_rows_for_new_items(tmp_path):
    cfg = job_config()
    earlier_ids = catalogue(32)
    earlier = model_of(dataclasses.replace(SPEC, num_items=32), text=TextEncoderConfig(enabled=False),
                       image=ImageEncoderConfig(enabled=False))
    save_checkpoint(tmp_path / "checkpoint", earlier, earlier_ids, cfg)
    # The new catalogue: two items gone, three new ones, so every index after the first new id shifts.
    grown_ids = sorted(set(earlier_ids) - {"item004", "item017"} | {"item0005a", "item020b", "new"})
    grown = model_of(dataclasses.replace(SPEC, num_items=len(grown_ids)), seed=1,
                     text=TextEncoderConfig(enabled=False), image=ImageEncoderConfig(enabled=False))
    carried = start_from(grown, str(tmp_path / "checkpoint"), grown_ids)
    assert carried == {"items_carried": 30, "items_new": 3}

    old_table = earlier.item_encoder.id_embedding.weight
    new_table = grown.item_encoder.id_embedding.weight
    for index, item_id in enumerate(grown_ids, start=1):
        if item_id in earlier_ids:
            assert torch.equal(new_table[index], old_table[earlier_ids.index(item_id) + 1])  # bit for bit
        else:
            assert torch.equal(new_table[index], torch.zeros(16))  # ranked from content until it trains
    assert torch.equal(new_table[0], old_table[0])
    for name, tensor in earlier.state_dict().items():
        if name != InterestFormer.ID_TABLE:
            assert torch.equal(grown.state_dict()[name], tensor), name


def test_a_checkpoint_of_another_model_fails_before_anything_starts(tmp_path):
    cfg = job_config()
    save_checkpoint(tmp_path / "checkpoint", model_of(text=TextEncoderConfig(enabled=False),
                                                      image=ImageEncoderConfig(enabled=False)), catalogue(32), cfg)
    wider = job_config(d_model=32)
    wider.train.init_from = str(tmp_path / "checkpoint")
    with pytest.raises(ConfigError, match="train.init_from.*does not fit"):
        check_start_from(wider)
    cfg.train.init_from = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="train.init_from.*no checkpoint"):
        check_start_from(cfg)
    same = job_config()
    same.train.init_from = str(tmp_path / "checkpoint")
    check_start_from(same)  # the same model section fits


def test_teachers_missing_reading_content_the_batches_lack_or_of_another_catalogue_fail_naming_the_key(tmp_path):
    text = {"enabled": True, "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    save_checkpoint(tmp_path / "id_only", model_of(text=TextEncoderConfig(enabled=False),
                                                   image=ImageEncoderConfig(enabled=False)), catalogue(32), job_config())
    save_checkpoint(tmp_path / "with_text", model_of(image=ImageEncoderConfig(enabled=False)), catalogue(32),
                    job_config(text=text))
    student = job_config()
    student.train.teachers = [str(tmp_path / "id_only"), str(tmp_path / "missing")]
    with pytest.raises(ConfigError, match="train.teachers.*no checkpoint"):
        check_teachers(student)
    student.train.teachers = [str(tmp_path / "id_only"), str(tmp_path / "with_text")]
    with pytest.raises(ConfigError, match="train.teachers.*encodes item text"):
        check_teachers(student)  # an ID-only student's batches carry no tokens
    reading_text = job_config(text=text)
    reading_text.train.teachers = student.train.teachers
    check_teachers(reading_text)  # its batches carry what both teachers read

    check_teacher_catalogues(reading_text, catalogue(32))
    with pytest.raises(ConfigError, match="train.teachers.*another catalogue"):
        check_teacher_catalogues(reading_text, catalogue(33))


def test_a_continued_run_reuses_the_earlier_runs_tokenizer_and_fails_when_it_is_gone(tmp_path):
    """Token ids mean what the earlier text encoder learned, so the continued run's data is
    tokenised by the earlier run's tokenizer, never by one trained afresh on the new catalogue."""
    from interestformer.jobs.train import tokenizer_path

    text = {"enabled": True, "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    cfg = job_config(text=text)
    save_checkpoint(tmp_path / "checkpoint", model_of(image=ImageEncoderConfig(enabled=False)), catalogue(32), cfg)
    continued = job_config(text=text)
    continued.train.init_from = str(tmp_path / "checkpoint")
    with pytest.raises(ConfigError, match="train.init_from.*tokenizer is gone"):
        check_start_from(continued)

    tokenizer = tmp_path / "checkpoint" / "prepared" / "tokenizer"  # where the earlier run's prepare left it
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer_config.json").write_text("{}")
    check_start_from(continued)
    assert tokenizer_path(continued) == str(tokenizer)
    continued.model.text.pretrained_path = "/models/minilm"  # a pretrained encoder brings its own
    assert tokenizer_path(continued) == "/models/minilm"


TOPICS, PER_TOPIC = 4, 8  # items 1..32: item i is of topic (i - 1) // PER_TOPIC


def topic_content(items: torch.Tensor, rng: np.random.Generator) -> dict:
    """Text tokens drawn from the item's topic's words, and a picture in the topic's colour."""
    topic = (items - 1).clamp(min=0) // PER_TOPIC
    tokens = torch.from_numpy(rng.integers(0, 10, (len(items), SPEC.text_max_tokens))) + 10 + 10 * topic[:, None]
    colours = torch.tensor([[250, 20, 20], [20, 250, 20], [20, 20, 250], [250, 250, 20]], dtype=torch.uint8)
    pixels = colours[topic][:, :, None, None].expand(-1, 3, 16, 16).clone()
    return {"text_tokens": tokens * (items > 0)[:, None], "text_mask": (items > 0)[:, None].long().expand(-1, 6),
            "pixels": pixels, "has_image": items > 0}


def test_a_brand_new_item_ranks_from_its_content_in_the_top_k_of_users_of_its_topic():
    """Users stay within one topic; the model trains on items 1..32, then a 33rd item of topic 2
    arrives. It never trained, its ID row is empty, and it is ranked from its words and picture."""
    torch.manual_seed(0)
    model = model_of(temperature=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(150):
        topics = rng.integers(0, TOPICS, 16)
        sequences = np.stack([1 + t * PER_TOPIC + rng.integers(0, PER_TOPIC, SPEC.max_seq_len + 1) for t in topics])
        history, targets = torch.from_numpy(sequences[:, :-1]), torch.from_numpy(sequences[:, 1:])
        unique = torch.unique(torch.cat([history.ravel(), targets.ravel(), torch.tensor([0])]))
        loss = model({"history": history, "targets": targets, "event_types": torch.ones_like(history),
                      "unique_items": unique, **topic_content(unique, rng)})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    grown = model_of(dataclasses.replace(SPEC, num_items=33), seed=1, temperature=0.1)
    grown.load_earlier(model.state_dict(), torch.arange(34).masked_fill(torch.arange(34) == 33, -1))
    items = torch.arange(34)
    with torch.no_grad():
        table = grown.encode_items(items, topic_content(torch.cat([items[:33], torch.tensor([2 * PER_TOPIC + 1])]), rng))
        history = torch.from_numpy(1 + 2 * PER_TOPIC + rng.integers(0, PER_TOPIC, (5, SPEC.max_seq_len)))  # topic 2
        users = grown.encode_users(table[history], history, torch.ones_like(history))[:, -1]
        scores = users @ F.normalize(table[1:], dim=-1).T  # items 1..33
    top = scores.topk(PER_TOPIC + 1, dim=1).indices + 1
    assert torch.equal(grown.item_encoder.id_embedding.weight[33], torch.zeros(16))
    assert all(33 in row for row in top.tolist()), top  # the new item is among its topic's, for every user


def test_a_user_without_events_is_ranked_by_popularity_and_the_others_by_the_model():
    model = model_of(text=TextEncoderConfig(enabled=False), image=ImageEncoderConfig(enabled=False))
    representations = torch.randn(SPEC.num_items + 1, 16)
    popularity = torch.randint(0, 50, (SPEC.num_items + 1,))
    history = torch.zeros(3, SPEC.max_seq_len, dtype=torch.long)
    history[1, -2:], history[2, -4:] = torch.tensor([4, 9]), torch.tensor([1, 2, 3, 4])
    targets = torch.tensor([7, 8, 9])
    batch = {"history": history, "event_types": (history > 0).long(), "targets": targets,
             "history_length": (history > 0).sum(1), "target_cold": torch.zeros(3, dtype=torch.bool)}
    totals = evaluate_model(model, representations, [batch], [1, 5], False, 8, popularity)
    with torch.no_grad():
        users = model.encode_users(representations[history], history, batch["event_types"])[:, -1]
    scores = users @ F.normalize(representations, dim=-1).T
    scores[0] = popularity.float()
    expected = RankTotals((1, 5))
    expected.add(row_ranks(scores, targets, None), batch["history_length"], batch["target_cold"], popularity[targets])
    assert totals.report() == pytest.approx(expected.report())


def test_an_ensemble_ranks_by_the_sum_of_its_members_cosines():
    members = [(model_of(seed=seed, text=TextEncoderConfig(enabled=False), image=ImageEncoderConfig(enabled=False)),
                torch.randn(SPEC.num_items + 1, 16)) for seed in (0, 1)]
    history = torch.zeros(4, SPEC.max_seq_len, dtype=torch.long)
    history[:, -3:] = torch.randint(1, SPEC.num_items + 1, (4, 3))
    targets = torch.tensor([5, 6, 7, 8])
    batch = {"history": history, "event_types": (history > 0).long(), "targets": targets,
             "history_length": (history > 0).sum(1), "target_cold": torch.zeros(4, dtype=torch.bool)}
    totals = evaluate_ensemble(members, [batch], [1, 5, 20], True, 8)
    with torch.no_grad():
        scores = sum(F.normalize(model.encode_users(table[history], history, batch["event_types"])[:, -1], dim=-1)
                     @ F.normalize(table, dim=-1).T for model, table in members)
    expected = RankTotals((1, 5, 20))
    expected.add(row_ranks(scores, targets, history), batch["history_length"], batch["target_cold"], None)
    assert totals.report() == pytest.approx(expected.report())
    alone = [evaluate_model(model, table, [batch], [1, 5, 20], True, 8).report() for model, table in members]
    assert all(report != pytest.approx(totals.report()) for report in alone)  # both members count
