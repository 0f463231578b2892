"""The Transformer module and its estimator: shapes, padding, ablations, save/load, learning."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from purchase_intent.models.classifier import TransformerClassifier
from purchase_intent.models.transformer import PRESETS, BehaviourTransformer, flops_per_sequence, preset
from purchase_intent.sequences import SequenceVocab

SIZES = {"event": 7, "item": 31, "category": 5}


def _batch(B=4, T=6, F=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {f: torch.randint(1, n, (B, T), generator=g) for f, n in SIZES.items()}
    lengths = torch.tensor([T, 3, 1, 0][:B])
    batch["mask"] = torch.arange(T)[None, :] >= (T - lengths)[:, None]  # right-aligned
    for f in SIZES:
        batch[f] = batch[f] * batch["mask"]
    batch["tabular"] = torch.randn(B, F, generator=g)
    return batch


def order_task(n, T=16, n_items=20, seed=0):
    """Label = a cart of item x comes before the view of x (else after): order is the only signal."""
    rng = np.random.default_rng(seed)
    L = rng.integers(4, T + 1, size=n)
    ev = rng.choice([1, 2, 4], size=(n, T), p=[0.7, 0.2, 0.1])
    item = rng.integers(1, n_items + 1, size=(n, T))
    y = rng.integers(0, 2, size=n)
    mask = np.arange(T)[None, :] >= (T - L)[:, None]
    for r in range(n):
        a, b = np.sort(rng.choice(np.arange(T - L[r], T), 2, replace=False))
        x = rng.integers(1, n_items + 1)
        item[r][item[r] == x] = x % n_items + 1  # x appears only in the pair
        ev[r, a], ev[r, b] = (2, 1) if y[r] else (1, 2)
        item[r, a] = item[r, b] = x
    ev[~mask], item[~mask] = 0, 0
    tab = np.stack([(ev == k).sum(1) for k in (1, 2, 4)] + [L], 1).astype(np.float32)  # order-blind counts
    return {"event": ev.astype(np.uint8), "item": item.astype(np.int16), "mask": mask, "tabular": tab}, y


def test_forward_backward_shapes_and_loss():
    torch.manual_seed(0)
    m = BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=3, max_seq_len=8))
    b = _batch()
    logits, loss = m(b)
    assert logits.shape == (4,) and loss is None
    logits, loss = m(b, torch.tensor([1.0, 0, 0, 1]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    m.cfg.pos_weight = 5.0
    _, weighted = m(b, torch.tensor([1.0, 0, 0, 1]))
    assert weighted > loss


def test_padding_is_invisible_and_trimming_keeps_logits():
    torch.manual_seed(0)
    m = BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=3, max_seq_len=8)).eval()
    b = _batch()
    ref, _ = m(b)
    noisy = dict(b)
    for f in SIZES:  # garbage in padded slots must not matter
        noisy[f] = torch.where(b["mask"], b[f], torch.randint(1, SIZES[f], b[f].shape))
    out, _ = m(noisy)
    torch.testing.assert_close(out, ref)
    wider = {k: (torch.cat([torch.zeros_like(v[:, :2]), v], 1) if k != "tabular" else v) for k, v in b.items()}
    torch.testing.assert_close(m(wider)[0], ref, rtol=1e-5, atol=1e-6)  # extra left padding: same ranks
    trimmed = {k: (v[:, 3:] if k != "tabular" else v) for k, v in b.items()}
    torch.testing.assert_close(m(trimmed)[0][1:], ref[1:], rtol=1e-5, atol=1e-6)


def test_ablation_switches_and_presets(capsys):
    b = _batch()
    for seq, tab in [(True, False), (False, True), (True, True)]:
        m = BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=3, max_seq_len=8,
                                        use_sequence=seq, use_tabular=tab))
        assert m(b)[0].shape == (4,)
        assert hasattr(m, "blocks") == seq and hasattr(m, "tab_mlp") == tab
    with pytest.raises(ValueError):
        BehaviourTransformer(preset("tiny", use_sequence=False, use_tabular=False))
    counts = [BehaviourTransformer(preset(p, field_sizes=SIZES, n_tabular=3)).num_parameters() for p in PRESETS]
    assert counts == sorted(counts) and preset("small").d_model == 64 and preset("small").n_layers == 2
    assert flops_per_sequence(preset("small"), 200) > flops_per_sequence(preset("tiny"), 200)


def _data(n, seed):
    rng = np.random.default_rng(seed)
    X, y = order_task(n, seed=seed)
    X["tabular"] = np.concatenate([X["tabular"], rng.normal(size=(n, 1))], 1)
    X["tabular"][rng.random(n) < 0.1, 0] = np.nan  # NaN is imputed inside the estimator
    return X, y


def test_classifier_contract_save_load(tmp_path):
    X, y = _data(96, 0)
    Xv, yv = _data(48, 1)
    vocab = SequenceVocab()
    clf = TransformerClassifier(max_epochs=2, batch_size=32, vocab=vocab, random_state=3)
    assert clf.get_params()["vocab"] is vocab
    assert clf.fit(X, y, X_valid=Xv, y_valid=yv) is clf
    X_sub = {k: v for k, v in X.items() if k in ("event", "item", "mask", "tabular")}
    p = clf.predict_proba(X_sub)
    assert p.shape == (96, 2) and np.allclose(p.sum(1), 1) and np.isfinite(p).all()
    # the item id is left out by default (drop_fields), every other field of X is used
    assert clf.model_config_.field_sizes == {"event": vocab.field_sizes()["event"]}
    clf.save(tmp_path)
    assert {"config.json", "model.safetensors"} <= {x.name for x in tmp_path.iterdir()}
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["params"]["vocab"]["cfg"]["item_buckets"] == vocab.cfg.item_buckets
    loaded = TransformerClassifier.load(tmp_path)
    np.testing.assert_allclose(loaded.predict_proba(X_sub), p, rtol=1e-5, atol=1e-6)
    assert loaded.vocab_ == vocab
    # no valid set: a temporal holdout (last rows); ablations and max_seq_len cut
    for kw in (dict(inputs="sequence", max_seq_len=4), dict(inputs="tabular", calibration="platt")):
        q = TransformerClassifier(max_epochs=1, batch_size=32, **kw).fit(X, y).predict_proba(X)
        assert q.shape == (96, 2)


def test_drop_fields_and_pooling_options(tmp_path):
    X, y = _data(64, 0)
    kw = dict(max_epochs=1, batch_size=32)
    with_item = TransformerClassifier(drop_fields=(), pooling="cls", **kw).fit(X, y)
    assert list(with_item.model_config_.field_sizes) == ["event", "item"] and with_item.model_.pool is None
    with_item.save(tmp_path)  # a run saved before the pooling option has no "pooling" key: [CLS] alone
    meta = json.loads((tmp_path / "config.json").read_text())
    for d in (meta["transformer"], meta["params"]):
        d.pop("pooling")
    meta["params"].pop("drop_fields")
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = TransformerClassifier.load(tmp_path)
    assert loaded.model_config_.pooling == "cls"
    assert loaded.get_params()["pooling"] == "cls" and list(loaded.get_params()["drop_fields"]) == []
    np.testing.assert_allclose(loaded.predict_proba(X), with_item.predict_proba(X), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown fields"):
        TransformerClassifier(drop_fields=("itme",), **kw).fit(X, y)
    one = TransformerClassifier(drop_fields="item", **kw).fit(X, y)  # a bare name, as from --param drop_fields=item
    assert list(one.model_config_.field_sizes) == ["event"]
    with pytest.raises(ValueError, match="pooling"):
        BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=3, pooling="mean"))


def test_max_pool_reads_the_strongest_event_and_ignores_padding():
    torch.manual_seed(0)
    m = BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=3, max_seq_len=8)).eval()
    assert m.cfg.pooling == "cls+max" and m.pool is not None
    from purchase_intent.models.transformer import _max_pool
    tokens = torch.tensor([[[5.0, -1.0], [1.0, 7.0], [9.0, 9.0]], [[3.0, 3.0], [-2.0, -4.0], [-1.0, -8.0]]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert _max_pool(tokens, mask).tolist() == [[5.0, 7.0], [-1.0, -4.0]]  # padding never wins
    assert _max_pool(tokens, torch.zeros_like(mask)).tolist() == [[0.0, 0.0], [0.0, 0.0]]  # no events: zeros
    b = _batch()  # its last row has no events at all
    logits, _ = m(b)
    assert torch.isfinite(logits).all()


def test_same_seed_same_model():
    X, y = _data(64, 0)
    a = TransformerClassifier(max_epochs=2, batch_size=16, random_state=1).fit(X, y).decision_function(X)
    b = TransformerClassifier(max_epochs=2, batch_size=16, random_state=1).fit(X, y).decision_function(X)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_learns_an_order_only_task():
    """Counts cannot tell the classes apart; the Transformer must read the order (about 2 min)."""
    X, y = order_task(10000, n_items=10, seed=0)
    Xv, yv = order_task(1000, n_items=10, seed=1)
    Xt, yt = order_task(2000, n_items=10, seed=2)
    kw = dict(max_epochs=15, lr=3e-3, batch_size=128, dropout=0.0, patience=15, drop_fields=())  # items matter here
    seq = TransformerClassifier(preset="tiny", n_layers=2, **kw).fit(X, y, Xv, yv)
    tab = TransformerClassifier(inputs="tabular", **kw).fit(X, y, Xv, yv)
    assert roc_auc_score(yt, seq.predict_proba(Xt)[:, 1]) > 0.75
    assert roc_auc_score(yt, tab.predict_proba(Xt)[:, 1]) < 0.6


def test_cls_only_last_block_equals_the_full_block_and_old_embeddings_load():
    torch.manual_seed(0)
    m = BehaviourTransformer(preset("tiny", field_sizes=SIZES, n_tabular=3, max_seq_len=8)).eval()
    b = _batch()
    x = torch.randn(4, 7, m.cfg.d_model)
    keep = torch.cat([b["mask"].new_ones(4, 1), b["mask"]], 1)[:, None, None, :]
    full, first = m.blocks[-1](x, keep), m.blocks[-1](x, keep, first_only=True)
    torch.testing.assert_close(first[:, 0], full[:, 0], rtol=1e-5, atol=1e-6)
    state = m.state_dict()  # runs saved with one table per field still load
    w = state.pop("embed.weight")
    state.update({f"embed.{f}.weight": t for f, t in zip(SIZES, w.split(list(SIZES.values())))})
    m2 = BehaviourTransformer(m.cfg).eval()
    m2.load_state_dict(state)
    torch.testing.assert_close(m2(b)[0], m(b)[0])


def test_fast_embedding_backward_and_dropout_match_torch():
    from purchase_intent.models.transformer import Dropout, FieldEmbeddings

    torch.manual_seed(0)
    fe = FieldEmbeddings(SIZES, 8)
    torch.nn.init.normal_(fe.weight)
    ids = torch.stack([torch.randint(0, n, (4, 6)) for n in SIZES.values()], dim=-1)  # (B, T, n_fields)
    g = torch.randn(4, 6, 8)
    fe.train()(ids).backward(g)  # index_add_ backward
    fast, fe.weight.grad = fe.weight.grad, None
    fe.eval()(ids).backward(g)  # torch's embedding_bag backward
    torch.testing.assert_close(fast, fe.weight.grad)
    d, x = Dropout(0.1), torch.ones(1000, 999)
    y = d(x)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005 and torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    assert d.eval()(x) is x and Dropout(0.0).train()(x) is x
    d.train()
    torch.manual_seed(1)
    a, b = d(torch.ones(7, 5)), d(torch.ones(7, 5))  # odd size; consecutive calls draw new masks
    torch.manual_seed(1)
    assert torch.equal(a, d(torch.ones(7, 5))) and torch.equal(b, d(torch.ones(7, 5)))  # torch's seed governs
    assert not torch.equal(d(torch.ones(100, 100)), d(torch.ones(100, 100)))


def test_flops_formula_matches_torch_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for name in ("tiny", "small"):
        m = BehaviourTransformer(preset(name, field_sizes=SIZES, max_seq_len=16, use_tabular=False))
        b = {f: torch.randint(1, n, (2, 16)) for f, n in SIZES.items()}
        b["mask"] = torch.ones(2, 16, dtype=torch.bool)
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):  # the counter skips CPU flash
            m(b, torch.tensor([0.0, 1.0]))[1].backward()
        assert fc.get_total_flops() / 2 == pytest.approx(flops_per_sequence(m.cfg, 16), rel=0.01)


@pytest.mark.parametrize("inputs", ["tabular", "sequence"])
def test_integrated_gradients_of_a_single_input_model_add_up(inputs):
    X, y = _data(64, 0)
    X["dt_cutoff"] = np.where(X["mask"], 3, 0).astype(np.uint8)
    clf = TransformerClassifier(inputs=inputs, max_epochs=1, batch_size=32, dropout=0.0).fit(X, y)
    c = clf.contributions(X, n_steps=64)
    np.testing.assert_allclose(c.total(), clf.decision_function(X), atol=2e-3)
    assert c.features.shape == X["tabular"].shape and c.events.shape == X["mask"].shape
    assert (c.events.any() if inputs == "sequence" else not c.events.any())
    assert (not c.features.any()) if inputs == "sequence" else c.features.any()


def test_to_batch_is_what_the_network_scores():
    X, y = _data(64, 0)
    clf = TransformerClassifier(max_epochs=1, batch_size=32, max_seq_len=6).fit(X, y)
    batch = clf.to_batch(X)
    assert batch["mask"].shape[1] <= 6 and batch["tabular"].dtype == torch.float32
    assert batch["tokens"].shape == (*batch["mask"].shape, len(clf.model_config_.field_sizes))
    with torch.no_grad():
        logits = clf.model_.eval().logits(batch).numpy()
    np.testing.assert_allclose(logits, clf.decision_function(X), rtol=1e-5, atol=1e-5)


def test_seed_ensemble_members_are_the_single_seed_models(tmp_path):
    from purchase_intent.models.attribution import module_integrated_gradients
    from purchase_intent.models.transformer import SeedEnsemble

    X, y = _data(96, 0)
    Xv, yv = _data(48, 1)
    kw = dict(max_epochs=2, batch_size=32, vocab=SequenceVocab())
    ens = TransformerClassifier(n_seeds=2, random_state=3, checkpoint_dir=str(tmp_path / "ckpt"), **kw)
    ens.fit(X, y, X_valid=Xv, y_valid=yv)
    assert isinstance(ens.model_, SeedEnsemble) and len(ens.model_.members) == 2
    assert len(ens.train_result_["members"]) == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["seed3", "seed4"]
    # member k is exactly the network that n_seeds=1 trains from seed random_state + k
    singles = [TransformerClassifier(random_state=s, **kw).fit(X, y, X_valid=Xv, y_valid=yv) for s in (3, 4)]
    for member, single in zip(ens.model_.members, singles):
        for (name, a), b in zip(member.state_dict().items(), single.model_.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(ens.model_.members[0].head[0].weight, ens.model_.members[1].head[0].weight)
    mean = np.mean([s.decision_function(X) for s in singles], axis=0)
    np.testing.assert_allclose(ens.decision_function(X), mean, rtol=1e-5, atol=1e-6)  # the mean logit
    # a rerun resumes each member from its finished checkpoint: the same model
    again = TransformerClassifier(n_seeds=2, random_state=3, checkpoint_dir=str(tmp_path / "ckpt"), **kw)
    np.testing.assert_array_equal(again.fit(X, y, X_valid=Xv, y_valid=yv).decision_function(X),
                                  ens.decision_function(X))
    # saved and loaded (without a pickle), the same probabilities
    ens.save(tmp_path / "run")
    loaded = TransformerClassifier.load(tmp_path / "run")
    assert isinstance(loaded.model_, SeedEnsemble) and loaded.get_params()["n_seeds"] == 2
    np.testing.assert_allclose(loaded.predict_proba(X), ens.predict_proba(X), rtol=1e-5, atol=1e-6)
    # explanations: the members' mean attributions still add up to the ensemble's logit
    tab, events, base = module_integrated_gradients(ens.model_, ens.to_batch(X), n_steps=64)
    np.testing.assert_allclose(base + tab.sum(axis=1) + events.sum(axis=1), ens.decision_function(X), atol=5e-3)
    members = [module_integrated_gradients(m, ens.to_batch(X), n_steps=64) for m in ens.model_.members]
    np.testing.assert_array_equal(tab, np.mean([m[0] for m in members], axis=0))  # the members' mean
    c = ens.contributions(X, n_steps=64)
    np.testing.assert_allclose(c.total(), ens.decision_function(X), atol=5e-3)
    with pytest.raises(ValueError, match="n_seeds"):
        TransformerClassifier(n_seeds=0, **kw).fit(X, y)


def test_seed_ensemble_killed_in_its_second_network_resumes_to_the_same_model(tmp_path, monkeypatch):
    import purchase_intent.models.classifier as C

    X, y = _data(96, 0)
    Xv, yv = _data(48, 1)
    kw = dict(max_epochs=3, batch_size=32, n_seeds=2, random_state=5)
    ref = TransformerClassifier(**kw).fit(X, y, X_valid=Xv, y_valid=yv).decision_function(X)
    real = C.train

    def kill_after_first_epoch(row):
        raise KeyboardInterrupt  # after the epoch's checkpoint is written

    def killed(net, train_data, valid_data, loop, collate):
        callbacks = [kill_after_first_epoch] if loop.seed == 6 else []  # the second network
        return real(net, train_data, valid_data, loop, callbacks=callbacks, collate=collate)

    monkeypatch.setattr(C, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        TransformerClassifier(checkpoint_dir=str(tmp_path), **kw).fit(X, y, X_valid=Xv, y_valid=yv)
    epochs_run = []  # (seed, epoch) of every epoch the rerun trains

    def recorded(net, train_data, valid_data, loop, collate):
        return real(net, train_data, valid_data, loop, collate=collate,
                    callbacks=[lambda row: epochs_run.append((loop.seed, row["epoch"]))])

    monkeypatch.setattr(C, "train", recorded)
    resumed = TransformerClassifier(checkpoint_dir=str(tmp_path), **kw).fit(X, y, X_valid=Xv, y_valid=yv)
    assert epochs_run and all(seed == 6 and epoch > 0 for seed, epoch in epochs_run)  # the rest came from checkpoints
    np.testing.assert_array_equal(resumed.decision_function(X), ref)


def test_a_small_train_set_gets_a_smaller_batch_so_that_an_epoch_has_enough_steps():
    m = TransformerClassifier(batch_size=512, min_steps_per_epoch=16)
    assert m.effective_batch_size(577) == 37 and -(-577 // 37) >= 16  # 16 steps, not 2
    assert m.effective_batch_size(100) == 32  # never below 32
    assert m.effective_batch_size(512 * 16) == 512 and m.effective_batch_size(10**6) == 512  # large: as given
    assert TransformerClassifier(batch_size=64).effective_batch_size(10**6) == 64
    assert TransformerClassifier(min_steps_per_epoch=1).effective_batch_size(577) == 512
