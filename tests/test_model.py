"""The interest Transformer on hand-built batches: causality, one encoding per unique item, learning."""

import numpy as np
import pytest
import torch

from interestformer.datasets.pipeline import id_buckets, left_pad
from interestformer.models.encoders import ImageEncoderConfig, TextEncoderConfig
from interestformer.models.interest_former import DataSpec, InterestFormer, ModelConfig
from interestformer.models.ranking import RankTotals, evaluate_model, item_representations, row_ranks

SPEC = DataSpec(num_items=30, num_event_types=3, max_seq_len=8, text_vocab_size=50, text_max_tokens=6, image_size=16)


def tiny_model(spec: DataSpec = SPEC, **overrides) -> InterestFormer:
    cfg = ModelConfig(**{
        "d_model": 16, "n_layers": 2, "n_heads": 2, "dropout": 0.0,
        "text": TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2),
        "image": ImageEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, patch_size=8),
        **overrides,
    })
    torch.manual_seed(0)
    return InterestFormer(cfg, spec).eval()


ID_ONLY = {"text": TextEncoderConfig(enabled=False), "image": ImageEncoderConfig(enabled=False)}


def batch_of(histories: list[list[int]], seed: int = 0) -> dict:
    """A packed batch as datasets/pipeline.py makes it, with random content per item."""
    rng = np.random.default_rng(seed)
    history = torch.from_numpy(left_pad([np.array(h[:-1]) for h in histories], SPEC.max_seq_len))
    targets = torch.from_numpy(left_pad([np.array(h[1:]) for h in histories], SPEC.max_seq_len))
    unique = torch.unique(torch.cat([history.ravel(), targets.ravel(), torch.tensor([0])]))
    content_rng = np.random.default_rng(1234)  # item content depends on the item only
    tokens = torch.from_numpy(content_rng.integers(5, SPEC.text_vocab_size, (SPEC.num_items + 1, SPEC.text_max_tokens)))
    pixels = torch.from_numpy(content_rng.integers(0, 256, (SPEC.num_items + 1, 3, 16, 16), dtype=np.uint8))
    return {
        "history": history,
        "event_types": (history > 0).long() * torch.from_numpy(rng.integers(1, 4, history.shape)),
        "targets": targets,
        "unique_items": unique,
        "text_tokens": tokens[unique],
        "text_mask": torch.ones(len(unique), SPEC.text_max_tokens, dtype=torch.long),
        "pixels": pixels[unique],
        "has_image": unique % 5 != 0,  # some items have no usable image
    }


def test_future_items_never_change_earlier_positions():
    model = tiny_model()
    history = torch.tensor([[0, 0, 3, 7, 9, 4, 12, 5]])  # left-padded, oldest first
    event_types = (history > 0).long()
    vectors = torch.randn(1, 8, 16)
    future_history, future_vectors = history.clone(), vectors.clone()
    future_history[0, -2:] = torch.tensor([21, 22])  # the last two events become other items
    future_vectors[0, -2:] = torch.randn(2, 16)
    with torch.no_grad():
        before = model.encode_users(vectors, history, event_types)
        after = model.encode_users(future_vectors, future_history, event_types)
    assert torch.equal(before[0, :-2], after[0, :-2])  # the past is untouched, bit for bit
    assert not torch.allclose(before[0, -1], after[0, -1], atol=1e-4)  # the changed positions move


def test_padding_does_not_leak_into_real_positions():
    model = tiny_model()
    short = batch_of([[3, 7, 9]])
    long = batch_of([[3, 7, 9], [1, 2, 4, 6, 10, 11, 13]])
    with torch.no_grad():
        a = model.user_vectors(short)[0]
        b = model.user_vectors(long)[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_each_unique_item_is_encoded_once_per_step():
    model = tiny_model()
    calls = {"text": 0, "image": 0}
    model.item_encoder.text_encoder.register_forward_hook(lambda m, i, o: calls.__setitem__("text", calls["text"] + o.shape[0]))
    model.item_encoder.image_encoder.register_forward_hook(lambda m, i, o: calls.__setitem__("image", calls["image"] + o.shape[0]))
    batch = batch_of([[3, 7, 3, 7, 3, 9], [7, 7, 3, 12], [3, 3, 3, 3]])  # heavy repetition
    model.train()
    model(batch).backward()
    unique = len(batch["unique_items"])
    assert calls["text"] == unique
    assert calls["image"] == int(batch["has_image"].sum())


MLP_PROJECTIONS = {"text": TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, projection="mlp"),
                   "image": ImageEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, patch_size=8, projection="mlp")}


@pytest.mark.parametrize("overrides", [{}, {"use_item_id": False}, MLP_PROJECTIONS], ids=["id_and_content", "content_only", "mlp_projections"])
def test_loss_falls_when_overfitting_a_batch(overrides):
    model = tiny_model(**overrides).train()
    batch = batch_of([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20, 21]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("teacher_weight, follows", [(1.0, "teacher"), (0.0, "targets")])
def test_a_distilled_student_learns_its_teachers_ranking_in_proportion_to_their_weight(teacher_weight, follows):
    """With the whole loss on the teachers, a student overfitting a batch ranks each position's
    candidates as the teachers do, not by the batch's targets; with none on them, by the targets."""
    batch = batch_of([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20, 21]])
    teachers = [tiny_model(**ID_ONLY, d_model=8), tiny_model(**ID_ONLY, d_model=16)]
    for seed, teacher in enumerate(teachers):
        torch.manual_seed(seed + 1)
        teacher.item_encoder.id_embedding.weight.data.normal_(0.0, 1.0)  # rankings far from the targets
    with torch.no_grad():
        teacher_logits = torch.stack([teacher.candidate_logits(batch)[0] for teacher in teachers]).mean(dim=0)
    student = tiny_model(**ID_ONLY).train()
    _, labels = student.candidate_logits(batch)
    assert (teacher_logits.argmax(dim=1) != labels).float().mean() > 0.8
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(150):
        loss = student(batch, teacher_logits, teacher_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        choice = student.eval().candidate_logits(batch)[0].argmax(dim=1)
    wanted = teacher_logits.argmax(dim=1) if follows == "teacher" else labels
    assert (choice == wanted).float().mean() > 0.8


def test_config_needs_at_least_one_item_input():
    from interestformer.errors import ConfigError

    with pytest.raises(ConfigError, match="use_item_id"):
        ModelConfig(use_item_id=False, text=TextEncoderConfig(enabled=False), image=ImageEncoderConfig(enabled=False))


def test_item_id_dropout_trains_content_alone_and_leaves_untrained_items_at_their_content():
    from interestformer.errors import ConfigError

    model = tiny_model(item_id_dropout=0.5).train()
    batch = batch_of([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(5):
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()
    table = model.item_encoder.id_embedding.weight.detach()
    assert table[1:15].abs().sum(-1).gt(0).all()  # trained rows moved from zero
    assert torch.equal(table[15:], torch.zeros_like(table[15:]))  # never in a batch: still no ID
    # In training, some items lose their ID part (about half, drawn anew each step); in evaluation none.
    # (The content encoders stay in eval mode, so that their own dropout does not move the vectors.)
    encoder, items = model.item_encoder, batch["unique_items"][1:]
    content = {k: batch[k][1:] for k in ("text_tokens", "text_mask", "pixels", "has_image")}
    model.eval()
    with torch.no_grad():
        full = encoder(items, content)
        encoder.training = True  # this module only
        dropped = encoder(items, content)
        encoder.training = False
        encoder.id_embedding.weight.zero_()
        content_only = encoder(items, content)
    lost = torch.isclose(dropped, content_only, atol=1e-5).all(-1)
    assert 0 < int(lost.sum()) < len(items)
    assert torch.allclose(dropped[~lost], full[~lost], atol=1e-5)
    with pytest.raises(ConfigError, match="item_id_dropout"):
        ModelConfig(item_id_dropout=0.3, **ID_ONLY)


def test_untrained_items_take_the_id_rows_of_their_content_neighbours():
    """model.cold_item_neighbours: an evaluation copy gives each item that training did not reach
    the softmax mix of its nearest trained items' ID rows, by the model's projection of their
    frozen content; an item whose content is a trained item's takes that item's row. Trained rows,
    and models without the option, are left as they are."""
    from dataclasses import replace

    from interestformer.errors import ConfigError

    spec = replace(SPEC, text_feature_dim=8)
    frozen_text = {"text": TextEncoderConfig(train_mode="frozen"), "image": ImageEncoderConfig(enabled=False)}
    model = tiny_model(spec, cold_item_neighbours=2, cold_item_temperature=0.001, **frozen_text)
    encoder = model.item_encoder
    features = torch.randn(31, 8)
    features[25], features[26] = features[3], features[7]  # items 25 and 26: the content of trained items 3 and 7
    encoder.load_content_features({"text_features": features})
    trained = torch.ones(31, dtype=torch.bool)
    trained[0] = trained[25:] = False  # padding, and items 25-30 that no training step reached
    encoder.load_trained_items(trained)
    before = encoder.id_embedding.weight.detach().clone()
    encoder.fill_untrained_ids()
    after = encoder.id_embedding.weight.detach()
    assert torch.equal(after[:25], before[:25])
    assert torch.allclose(after[25], before[3], atol=1e-5) and torch.allclose(after[26], before[7], atol=1e-5)
    assert not torch.isclose(after[27:], before[27:]).all(-1).any()  # every other untrained row moved
    assert "item_encoder.id_trained" in model.state_dict()  # saved with the weights: a checkpoint fills alike

    # Started from this model on a catalogue where item 3 is now item 1 and items 26 and 27 are gone:
    # a carried row the earlier model trained stays trained though this run's data does not reach it.
    later = tiny_model(spec, cold_item_neighbours=2, **frozen_text)
    later.item_encoder.load_trained_items(torch.zeros(31, dtype=torch.bool))
    earlier_rows = torch.tensor([0, 3, 25] + [-1] * 28)
    later.load_earlier(model.state_dict(), earlier_rows)
    assert torch.nonzero(later.item_encoder.id_trained).squeeze(1).tolist() == [1]

    plain = tiny_model(spec, **frozen_text)
    table = plain.item_encoder.id_embedding.weight.detach().clone()
    plain.item_encoder.fill_untrained_ids()
    assert torch.equal(plain.item_encoder.id_embedding.weight, table)
    for overrides, key in (({"cold_item_neighbours": 3, **ID_ONLY}, "cold_item_neighbours"),
                           ({"cold_item_neighbours": 3, "item_id_buckets": 8, **frozen_text}, "cold_item_neighbours"),
                           ({"cold_item_neighbours": 3}, "cold_item_neighbours"),  # live encoders only
                           ({"cold_item_neighbours": -1, **frozen_text}, "cold_item_neighbours"),
                           ({"cold_item_neighbours": 3, "cold_item_temperature": 0.0, **frozen_text},
                            "cold_item_temperature")):
        with pytest.raises(ConfigError, match=key):
            ModelConfig(**overrides)


def test_hashed_item_ids_keep_their_row_in_any_catalogue_and_colliding_items_share_it():
    catalogue = [f"i{n:06d}" for n in range(SPEC.num_items)]
    rows = id_buckets(catalogue, 8)
    assert rows[0] == 0 and set(rows[1:]) <= set(range(1, 9))
    later = id_buckets(["new"] + catalogue[::-1], 8)  # another version: reordered, one item more
    assert dict(zip(catalogue, rows[1:])) == dict(zip(catalogue[::-1], later[2:]))

    model = tiny_model(item_id_buckets=8, **ID_ONLY)
    assert sum(p.numel() for p in model.parameters()) == (
        sum(p.numel() for p in tiny_model(**ID_ONLY).parameters()) - (SPEC.num_items - 8) * 16)
    with pytest.raises(IndexError):  # an unfilled map fails rather than reading the padding row
        model.encode_items(torch.tensor([1, 2]), {})
    model.item_encoder.load_id_buckets(torch.from_numpy(rows))
    a, b = np.flatnonzero(rows == rows[1])[:2]  # 30 items in 8 rows: item 1 collides with another
    with torch.no_grad():
        vectors = model.encode_items(torch.tensor([a, b, 2]), {})
    assert torch.equal(vectors[0], vectors[1]) and not torch.equal(vectors[0], vectors[2])

    model.train()
    model(batch_of([[1, 2, 3, 4, 5], [6, 7, 8, 9]])).backward()  # a training step reaches the shared rows
    used = model.item_encoder.id_embedding.weight.grad.abs().sum(1) > 0
    assert used[torch.from_numpy(rows[1:10])].all() and not used[0]
    assert torch.equal(model.state_dict()["item_encoder.id_bucket"], torch.from_numpy(rows))  # saved with weights


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone: what ShardedEmbedding's collectives need."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_an_id_table_sharded_on_one_rank_looks_up_learns_and_resumes_as_the_table(one_rank_group):
    """train.shard_item_table on one worker: the rows held outside the model's parameters give the
    same vectors and gradients, the padding row never learns, and a rank's saved rows and AdamW
    state restore exactly (2 workers: tests/test_zero_stages.py)."""
    whole, sharded = tiny_model(**ID_ONLY).train(), tiny_model(**ID_ONLY).train()
    adamw = {"lr": 0.1, "betas": (0.9, 0.98), "weight_decay": 0.0}
    sharded.item_encoder.shard_id_table(adamw, grad_clip=0.0)
    table = sharded.item_encoder.id_embedding
    assert InterestFormer.ID_TABLE not in sharded.state_dict()  # not DeepSpeed's to average or partition
    assert not any(p is table.rows for p in sharded.parameters())
    assert torch.equal(table.full_weight(), whole.item_encoder.id_embedding.weight)
    batch = batch_of([[1, 2, 3, 30, 5], [6, 17, 8, 29]])
    whole(batch).backward()
    sharded(batch).backward()
    assert torch.allclose(table.rows.grad, whole.item_encoder.id_embedding.weight.grad, atol=1e-7)
    assert table.rows.grad[0].abs().sum() == 0  # padding never learns

    table.step(0.1)
    saved = {k: v.clone() for k, v in table.shard_state().items()}
    assert set(saved) == {"rows", "step", "exp_avg", "exp_avg_sq"}
    assert not torch.equal(saved["rows"], whole.item_encoder.id_embedding.weight)
    sharded(batch).backward()
    table.step(0.1)
    stepped = table.rows.detach().clone()
    other = tiny_model(**ID_ONLY).train()
    other.item_encoder.shard_id_table(adamw, grad_clip=0.0)
    other.item_encoder.id_embedding.load_shard_state(saved)
    other(batch).backward()
    other.item_encoder.id_embedding.step(0.1)
    assert torch.equal(other.item_encoder.id_embedding.rows, stepped)  # moments and step count came back


def test_a_sharded_table_clips_its_gradient_by_its_own_norm(one_rank_group):
    """grad_clip on a sharded table: its AdamW steps on the gradient scaled to norm grad_clip, as
    torch's clip_grad_norm_ on the table alone would give (what test_zero_stages cannot show:
    its trajectories run without clipping)."""
    whole, sharded = tiny_model(**ID_ONLY).train(), tiny_model(**ID_ONLY).train()
    sharded.item_encoder.shard_id_table({"lr": 0.1, "betas": (0.9, 0.98), "weight_decay": 0.01}, grad_clip=1e-3)
    table, reference = sharded.item_encoder.id_embedding.rows, whole.item_encoder.id_embedding.weight
    optimizer = torch.optim.AdamW([reference], lr=0.1, betas=(0.9, 0.98), weight_decay=0.01)
    batch = batch_of([[1, 2, 3, 30, 5], [6, 17, 8, 29]])
    for _ in range(2):
        whole(batch).backward()
        sharded(batch).backward()
        assert torch.nn.utils.clip_grad_norm_([reference], 1e-3) > 1e-3  # the clip does act
        optimizer.step()
        optimizer.zero_grad()
        sharded.item_encoder.id_embedding.step(0.1)
    assert torch.allclose(table, reference, atol=1e-6)


def test_causal_attention_without_a_mask_equals_the_masked_path():
    model = tiny_model()
    full, padded = [1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 4, 5]
    with torch.no_grad():
        unmasked = model.user_vectors(batch_of([full]))  # no padding: is_causal, no mask
        masked = model.user_vectors(batch_of([full, padded]))  # padding in the batch: the mask path
    assert torch.allclose(unmasked[0], masked[0], atol=1e-5)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    batch = batch_of([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]])
    results = []
    for checkpointing in (False, True):
        model = tiny_model(activation_checkpointing=checkpointing).train()
        loss = model(batch)
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.allclose(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    assert all(torch.allclose(grads[name], grads_ckpt[name], atol=1e-6) for name in grads)


def test_a_sequence_of_4096_trains_on_cpu():
    T = 4096
    spec = DataSpec(num_items=100, num_event_types=1, max_seq_len=T, text_vocab_size=2, text_max_tokens=2,
                    image_size=16)
    model = tiny_model(spec, n_layers=1, activation_checkpointing=True, **ID_ONLY).train()
    items = torch.randint(1, spec.num_items + 1, (1, T + 1))
    batch = {"history": items[:, :-1], "targets": items[:, 1:], "event_types": torch.ones(1, T, dtype=torch.long),
             "unique_items": torch.unique(torch.cat([items.ravel(), torch.tensor([0])]))}
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.position.weight.grad[T - 1].abs().sum() > 0  # the oldest position learns


def test_evaluation_ranks_users_read_from_the_encoded_catalogue_as_users_encoded_from_content():
    """evaluate_model reads each history item's row of the catalogue table instead of encoding
    the batch's items again: the ranks must be those of InterestFormer.user_vectors, which
    encodes them from their text and pictures."""
    model = tiny_model()
    catalogue = batch_of([list(range(first, min(first + 9, SPEC.num_items + 1))) for first in (1, 10, 19, 28)])
    assert catalogue["unique_items"].tolist() == list(range(SPEC.num_items + 1))  # every item, once
    table = item_representations(model, [catalogue], SPEC.num_items)
    batch = batch_of([[3, 7, 9, 12, 4], [5, 5, 20], [1, 2, 3, 4, 5, 6, 7, 8, 9], [30, 2]], seed=1)
    targets = batch["targets"][:, -1]
    history_length, cold = (batch["history"] > 0).sum(dim=1), torch.zeros(len(targets), dtype=torch.bool)

    with torch.no_grad():
        scores = model.user_vectors(batch) @ torch.nn.functional.normalize(table, dim=-1).T
    expected = RankTotals((1, 5, 10))
    expected.add(row_ranks(scores, targets, batch["history"]), history_length, cold)
    evaluated = evaluate_model(model, table, [{**batch, "targets": targets, "history_length": history_length,
                                               "target_cold": cold}], (1, 5, 10), exclude_history=True, chunk_size=7)
    assert evaluated.metrics() == pytest.approx(expected.metrics())
    assert evaluated.histogram == expected.histogram  # the same rank for every user
