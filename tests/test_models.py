import pytest
import torch

from captioner.models.decoder import AttentionDecoder
from captioner.models.encoder import ENCODERS, Encoder
from captioner.training.losses import caption_loss


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_encoder_gives_finite_grid(name):
    torch.manual_seed(0)
    kwargs = {"channels": 16} if name == "shapes_cnn" else {}
    if name == "efficientnet_lite0":
        kwargs = {"stage": "stage5"}
    enc = Encoder(name, weights=None, grid=4, freeze=False, **kwargs)
    x = torch.randn(2, 3, 32, 32)  # small input keeps the sweep fast; the grid is pooled to 4x4
    feats = enc(x)
    assert feats.shape == (2, 16, enc.out_dim)
    assert torch.isfinite(feats).all()
    assert feats.std() > 0
    feats.mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_frozen_encoder_keeps_batchnorm_in_eval():
    enc = Encoder("resnet18", weights=None, grid=2, freeze=True)
    enc.train()
    assert not enc.body.training
    before = enc.body[1].running_mean.clone()
    enc(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(before, enc.body[1].running_mean)  # statistics did not drift
    assert not any(p.requires_grad for p in enc.parameters())


def test_native_grid_without_pooling():
    enc = Encoder("shapes_cnn", grid=None, freeze=False, channels=32)
    assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 64, 32)  # 64 px / 2^3 = 8x8 grid


def _decoder(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=11, feature_dim=6, embed_dim=8, hidden_dim=10, attn_dim=7, dropout=0.0)
    args.update(kw)
    return AttentionDecoder(**args)


def _batch(B=3, L=5, D=6, T=7, V=11):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(B, L, D, generator=g)
    caps = torch.randint(4, V, (B, T), generator=g)
    caps[:, 0] = 1
    lengths = torch.tensor([T, T - 2, 3])[:B]
    for b in range(B):
        caps[b, lengths[b] - 1] = 2
        caps[b, lengths[b]:] = 0
    return feats, caps, lengths


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_step_shapes_and_attention_sums_to_one(attention):
    dec = _decoder(attention=attention)
    feats, caps, _ = _batch()
    mem = dec.init_memory(feats)
    state = dec.init_state(mem)
    out = dec.step(caps[:, 0], state, mem)
    assert out.log_probs.shape == (3, 11) and out.alpha.shape == (3, 5)
    torch.testing.assert_close(out.alpha.sum(-1), torch.ones(3))
    torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(3))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_every_trainable_parameter_gets_a_gradient(cell, layers):
    dec = _decoder(cell=cell, num_layers=layers)
    feats, caps, lengths = _batch()
    out = dec(feats, caps, lengths)
    loss = caption_loss(out, caps, lambda_ds=1.0)["loss"]
    loss.backward()
    for n, p in dec.named_parameters():
        assert p.grad is not None, n
        if n != "embed.weight":  # only the embedding rows of used words move
            assert p.grad.abs().sum() > 0, n


def test_padding_does_not_change_the_loss():
    dec = _decoder()
    feats, caps, lengths = _batch()
    base = caption_loss(dec(feats, caps, lengths), caps)
    wider = torch.cat([caps, torch.zeros(3, 5, dtype=torch.long)], dim=1)  # more padding
    more = caption_loss(dec(feats, wider, lengths), wider)
    torch.testing.assert_close(base["loss"], more["loss"])
    garbage = caps.clone()
    for b, n in enumerate(lengths.tolist()):
        garbage[b, n:] = 0
    # without explicit lengths the decoder infers them from the padding and agrees
    torch.testing.assert_close(caption_loss(dec(feats, garbage), garbage)["loss"], base["loss"])


def test_shrinking_batch_matches_one_caption_at_a_time():
    dec = _decoder()
    feats, caps, lengths = _batch()
    out = dec(feats, caps, lengths)
    for b in range(3):
        n = int(lengths[b])
        single = dec(feats[b : b + 1], caps[b : b + 1, :n])
        torch.testing.assert_close(out.log_probs[b, : n - 1], single.log_probs[0])
        torch.testing.assert_close(out.alphas[b, : n - 1], single.alphas[0])
        assert out.log_probs[b, n - 1 :].abs().sum() == 0  # padded positions are never computed


def test_feature_projection_computed_once_per_image(monkeypatch):
    dec = _decoder()
    feats, caps, lengths = _batch()
    calls = []
    orig = dec.attention.project
    monkeypatch.setattr(dec.attention, "project", lambda f: calls.append(1) or orig(f))
    dec(feats, caps, lengths)
    assert len(calls) == 1


def test_doubly_stochastic_penalty_is_zero_when_attention_covers_each_location_once():
    from captioner.training.losses import doubly_stochastic

    T, L = 4, 4
    alphas = torch.eye(T).unsqueeze(0)  # step t attends only location t
    targets = torch.ones(1, T, dtype=torch.long)
    assert doubly_stochastic(alphas, targets) == 0
    uniform = torch.full((1, T, L), 1.0 / L)
    assert doubly_stochastic(uniform, targets) == 0  # sum_t alpha_ti = 1 as well
    assert doubly_stochastic(uniform[:, :2], targets[:, :2]) == pytest.approx(0.25)  # (1 - 0.5)^2


def test_bad_decoder_options():
    with pytest.raises(ValueError, match="cell"):
        _decoder(cell="transformer")
    with pytest.raises(ValueError, match="num_layers"):
        _decoder(num_layers=5)
    with pytest.raises(ValueError, match="query"):
        _decoder(query="next")
    with pytest.raises(ValueError, match="query"):
        _decoder(query="current", attention="none")
    with pytest.raises(ValueError, match="query"):
        _decoder(query="topdown", attention="none", num_layers=2)
    with pytest.raises(ValueError, match="num_layers >= 2"):
        _decoder(query="topdown")
    with pytest.raises(KeyError, match="unknown encoder"):
        Encoder("resnet9000")


@pytest.mark.parametrize("image_input", ["init", "first"])
def test_show_tell_gradients_and_uniform_maps(image_input):
    dec = _decoder(attention="none", image_input=image_input, beta_gate=False)
    feats, caps, lengths = _batch()
    out = dec(feats, caps, lengths)
    caption_loss(out, caps, lambda_ds=0.0)["loss"].backward()
    for n, p in dec.named_parameters():
        assert p.grad is not None, n
    assert dec.attention is None
    torch.testing.assert_close(out.alphas[0, 0], torch.full((5,), 0.2))
    # the image matters: other features, other word distribution
    assert not torch.allclose(dec(feats.flip(0), caps, lengths).log_probs[0, 0], out.log_probs[0, 0])


def test_show_tell_decodes_with_every_strategy():
    from captioner.config import DecodeConfig
    from captioner.data.vocab import Vocabulary
    from captioner.decoding import decode

    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(7)])
    dec = _decoder(attention="none").eval()
    feats, _, _ = _batch()
    for strategy in ("greedy", "sample", "beam"):
        caps = decode(dec, feats, vocab, DecodeConfig(strategy=strategy, max_len=5, beam_size=3))
        assert len(caps) == 3 and all(c.attention.shape == (len(c.tokens), 5) for c in caps)


def test_show_tell_rejects_first_input_with_attention():
    with pytest.raises(ValueError, match="image_input"):
        _decoder(attention="soft", image_input="first")


def test_image_of_projects_once_per_image_and_matches_expanded_features():
    dec = _decoder()
    feats, caps, lengths = _batch()
    image_of = torch.tensor([1, 0, 1])
    grouped = dec(feats[:2], caps, lengths, image_of=image_of)
    expanded = dec(feats[:2].index_select(0, image_of), caps, lengths)
    torch.testing.assert_close(grouped.log_probs, expanded.log_probs)
    torch.testing.assert_close(grouped.alphas, expanded.alphas)


@pytest.mark.parametrize("attention", ["soft", "hard"])
def test_low_rank_context_equals_the_full_model_with_factorised_weights(attention):
    """context_dim=C is the paper's model whose context-reading weights are W @ P (rank C)."""
    torch.manual_seed(0)
    small = _decoder(attention=attention, context_dim=4)  # features are 6-wide
    full = _decoder(attention=attention)
    P = small.context_proj.weight  # (C, D)
    E = small.embed.weight.size(1)
    with torch.no_grad():
        sd = {k: v.clone() for k, v in small.state_dict().items() if not k.startswith("context_proj")}
        sd["cells.0.weight_ih"] = torch.cat([sd["cells.0.weight_ih"][:, :E], sd["cells.0.weight_ih"][:, E:] @ P], 1)
        sd["out_z.weight"] = sd["out_z.weight"] @ P
        sd["init_mlp.0.weight"] = sd["init_mlp.0.weight"] @ P
        full.load_state_dict(sd)
    small.eval(), full.eval()
    feats, caps, lengths = _batch()
    a, b = small(feats, caps, lengths, attend="argmax"), full(feats, caps, lengths, attend="argmax")
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.alphas, b.alphas, atol=1e-6, rtol=1e-5)
    # ... and it trains: every parameter, the projection included, gets a gradient
    small.train()
    caption_loss(small(feats, caps, lengths), caps, lambda_ds=1.0)["loss"].backward()
    for n, p in small.named_parameters():
        assert p.grad is not None and (n == "embed.weight" or p.grad.abs().sum() > 0), n
    with pytest.raises(ValueError, match="context_dim"):
        _decoder(context_dim=6)  # not smaller than the features


def test_attention_scores_are_the_papers_tanh_form_in_every_code_path(monkeypatch):
    """w^T tanh(W_a a + b + W_h h), whether computed with autograd, in cache-sized chunks, or grouped."""
    from captioner.models.attention import AdditiveScorer

    torch.manual_seed(0)
    scorer = AdditiveScorer(6, 10, 7)
    feats, hidden = torch.randn(4, 5, 6), torch.randn(12, 10)  # 4 images, 3 rows each
    expanded = feats.repeat_interleave(3, dim=0)  # (12, 5, 6)
    reference = (torch.tanh(scorer.feature_proj(expanded) + scorer.hidden_proj(hidden).unsqueeze(1)) @ scorer.score.weight.T).squeeze(-1)
    grouped = scorer(scorer.project(feats), hidden)  # with autograd, unchunked
    torch.testing.assert_close(grouped, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer(scorer.project(expanded), hidden), reference, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(AdditiveScorer, "CHUNK", 40)  # fewer elements than one image's rows: chunks of 1 image
    with torch.no_grad():
        torch.testing.assert_close(scorer(scorer.project(feats), hidden), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scorer(scorer.project(expanded), hidden), reference, atol=1e-5, rtol=1e-5)
    # gradients agree with the tanh form too
    g1 = torch.autograd.grad(grouped.square().sum(), scorer.hidden_proj.weight)[0]
    g2 = torch.autograd.grad(reference.square().sum(), scorer.hidden_proj.weight)[0]
    torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="rows per image"):
        scorer(scorer.project(feats), hidden[:10])


@pytest.mark.parametrize("kind", ["soft", "hard", "none", "context", "current", "topdown"])
def test_rows_sharing_an_image_memory_match_copies_of_it(kind):
    """Beam search's K rows per image read one memory entry: the same step as K copies of it."""
    kw = {"soft": {}, "hard": {"attention": "hard"}, "none": {"attention": "none", "beta_gate": False},
          "context": {"context_dim": 4}, "current": {"query": "current", "context_dim": 4},
          "topdown": {"query": "topdown", "num_layers": 2, "context_dim": 4}}[kind]
    dec = _decoder(**kw).eval()
    feats, caps, _ = _batch()
    K = 4
    mem = dec.init_memory(feats)
    state = dec.init_state(mem)
    rows = torch.arange(3).repeat_interleave(K)
    state = state.index_select(rows)
    words = torch.randint(4, 11, (3 * K,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = dec.step(words, state, mem, attend="argmax")  # 3 memory entries, 3*K rows
        b = dec.step(words, state, mem.index_select(rows), attend="argmax")
    torch.testing.assert_close(a.log_probs, b.log_probs)
    torch.testing.assert_close(a.alpha, b.alpha)
    torch.testing.assert_close(a.state.h, b.state.h)
    if kind == "hard":
        assert torch.equal(a.location, b.location)
    if kind != "none":  # Show and Tell reads no per-image memory in a step
        with pytest.raises(ValueError, match="not a whole number of rows per image"):
            dec.step(words[:-1], state.index_select(torch.arange(3 * K - 1)), mem)


def test_input_dropout_only_acts_in_training_and_adds_no_weights():
    plain = _decoder()
    dropped = _decoder(feature_dropout=0.5, embed_dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # old checkpoints load into either
    feats, caps, lengths = _batch()
    dropped.eval()
    torch.testing.assert_close(dropped(feats, caps, lengths).log_probs, plain.eval()(feats, caps, lengths).log_probs)
    dropped.train()
    torch.manual_seed(0)
    noisy = dropped(feats, caps, lengths).log_probs
    assert (noisy - plain(feats, caps, lengths).log_probs).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["soft", "none"])
def test_feature_dropout_reaches_everything_the_image_enters(attention):
    # p = 1 drops every annotation value: attention scores, context and initial state no longer see the image
    dec = _decoder(attention=attention, feature_dropout=1.0).train()
    feats, caps, lengths = _batch()
    other = torch.randn_like(feats) * 3 + 1
    torch.testing.assert_close(dec(feats, caps, lengths).log_probs, dec(other, caps, lengths).log_probs)
    assert (dec.eval()(feats, caps, lengths).log_probs - dec(other, caps, lengths).log_probs).abs().max() > 1e-3


def test_embed_dropout_reaches_every_use_of_the_previous_word():
    # p = 1 zeroes the embeddings fed to the cell and to the deep output: the words before no longer matter
    dec = _decoder(embed_dropout=1.0).train()
    feats, caps, lengths = _batch()
    shuffled = caps.clone()
    shuffled[:, 1:] = torch.where(caps[:, 1:] >= 4, 4 + (caps[:, 1:] - 4 + 3) % 7, caps[:, 1:])  # other words, same layout
    assert not torch.equal(shuffled, caps)
    torch.testing.assert_close(dec(feats, caps, lengths).log_probs, dec(feats, shuffled, lengths).log_probs)


@pytest.mark.parametrize("attention", ["soft", "none"])
def test_tied_embeddings_are_one_matrix_whose_gradient_sums_both_uses(attention):
    tied = _decoder(attention=attention, tie_embeddings=True).double()
    assert tied.out.weight is tied.embed.weight
    untied = _decoder(attention=attention).double()
    untied.load_state_dict(tied.state_dict())  # the same keys: equal input and output matrices, held apart
    V, E = tied.embed.weight.shape
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == V * E
    feats, caps, lengths = _batch()
    feats = feats.double()
    out_t, out_u = tied(feats, caps, lengths), untied(feats, caps, lengths)
    torch.testing.assert_close(out_t.log_probs, out_u.log_probs, rtol=1e-12, atol=1e-12)
    caption_loss(out_t, caps)["loss"].backward()
    caption_loss(out_u, caps)["loss"].backward()
    g_in, g_out = untied.embed.weight.grad, untied.out.weight.grad
    assert g_in.abs().max() > 1e-6 and g_out.abs().max() > 1e-6  # both uses carry a gradient
    torch.testing.assert_close(tied.embed.weight.grad, g_in + g_out, rtol=1e-10, atol=1e-12)


def test_tied_embeddings_need_embed_dim_wide_pre_logits():
    with pytest.raises(ValueError, match="tie_embeddings"):
        _decoder(tie_embeddings=True, deep_output=False)  # hidden 10, embeddings 8
    dec = _decoder(tie_embeddings=True, deep_output=False, hidden_dim=8)
    assert dec.out.weight is dec.embed.weight


@pytest.mark.parametrize("query", ["previous", "current", "topdown"])
def test_only_the_current_and_topdown_queries_let_the_input_word_choose_where_to_look(query):
    # previous (the paper): alpha_t is scored with h_{t-1}, before the cell reads y_{t-1}; current (Lu et al.
    # 2017): the cell reads y_{t-1} first and h_t scores the locations; topdown: the attention cell reads it
    dec = _decoder(query=query, num_layers=2 if query == "topdown" else 1).eval()
    feats, caps, _ = _batch()
    mem = dec.init_memory(feats)
    state = dec.init_state(mem)
    with torch.no_grad():
        a, b = dec.step(caps[:, 1], state, mem), dec.step(caps[:, 2], state, mem)
    assert not torch.equal(caps[:, 1], caps[:, 2])
    moved = (a.alpha - b.alpha).abs().max()
    assert (moved > 1e-3) if query != "previous" else (moved == 0)
    assert (a.log_probs - b.log_probs).abs().max() > 1e-3  # the word reaches the output either way


@pytest.mark.parametrize("query, cell, layers, attention", [
    ("current", "lstm", 1, "soft"), ("current", "gru", 2, "soft"), ("current", "lstm", 2, "hard"),
    ("topdown", "lstm", 2, "soft"), ("topdown", "gru", 3, "soft"), ("topdown", "lstm", 3, "hard")])
def test_other_queries_train_every_parameter_and_steps_match_teacher_forcing(query, cell, layers, attention):
    dec = _decoder(query=query, cell=cell, num_layers=layers, attention=attention, context_dim=4).double()
    feats, caps, lengths = _batch()
    feats = feats.double()
    out = dec(feats, caps, lengths, attend="argmax")
    caption_loss(out, caps, lambda_ds=1.0)["loss"].backward()
    for n, p in dec.named_parameters():
        assert p.grad is not None, n
        if n != "embed.weight":
            assert p.grad.abs().sum() > 0, n
    mem = dec.init_memory(feats)  # one word at a time through step() gives the teacher-forced numbers
    state = dec.init_state(mem)
    for t in range(int(lengths.min()) - 1):
        o = dec.step(caps[:, t], state, mem, attend="argmax")
        torch.testing.assert_close(o.log_probs, out.log_probs[:, t], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(o.alpha, out.alphas[:, t], rtol=1e-10, atol=1e-12)
        state = o.state


@pytest.mark.parametrize("layers", [2, 3])
def test_topdown_step_is_anderson_et_al_wiring(layers):
    """query="topdown", one step written out by hand from the module's weights (Anderson et al. 2018, eqs. 2-6)."""
    dec = _decoder(query="topdown", num_layers=layers, context_dim=4).double().eval()
    feats, caps, _ = _batch()
    feats = feats.double()
    mem = dec.init_memory(feats)
    state = dec.init_state(mem)
    g = torch.Generator().manual_seed(5)  # a state unlike the initial one: the top layer's h differs from the rest
    state = type(state)(torch.randn(state.h.shape, generator=g, dtype=torch.float64),
                        torch.randn(state.c.shape, generator=g, dtype=torch.float64))
    with torch.no_grad():
        out = dec.step(caps[:, 1], state, mem)
        emb = dec.embed(caps[:, 1])  # (B, E)
        values = feats @ dec.context_proj.weight.T  # (B, L, C)
        h1, c1 = dec.cells[0](torch.cat([emb, values.mean(1), state.h[-1]], -1), (state.h[0], state.c[0]))
        sc = dec.attention.scorer  # e_ti = w^T tanh(W_a a_i + b + W_h h^1_t)
        scores = torch.tanh(feats @ sc.feature_proj.weight.T + sc.feature_proj.bias + (h1 @ sc.hidden_proj.weight.T)[:, None])
        alpha = torch.softmax((scores @ sc.score.weight.T).squeeze(-1), -1)  # (B, L)
        z = torch.sigmoid(dec.f_beta(h1)) * (alpha[:, :, None] * values).sum(1)  # (B, C) gated context
        x, hs, cs = torch.cat([z, h1], -1), [h1], [c1]
        for i in range(1, layers):  # the language cell(s)
            h, c = dec.cells[i](x, (state.h[i], state.c[i]))
            hs.append(h), cs.append(c)
            x = h
        logits = dec.out(torch.tanh(emb + dec.out_h(x) + dec.out_z(z)))
    torch.testing.assert_close(out.alpha, alpha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.state.h, torch.stack(hs), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.state.c, torch.stack(cs), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.log_probs, torch.log_softmax(logits, -1), rtol=1e-10, atol=1e-12)
    assert dec.cells[0].input_size == 8 + 4 + 10 and dec.cells[1].input_size == 4 + 10


def test_grid_position_codes_say_where_a_location_is_on_any_square_grid():
    from captioner.models.decoder import grid_positions

    for g in (3, 7, 9):
        codes = grid_positions(g * g).view(g, g, 4, -1)  # (row, col, [sin y, cos y, sin x, cos x], frequency)
        mid = g // 2  # odd grids have a centre location at y = x = 0: every sine 0, every cosine 1
        torch.testing.assert_close(codes[mid, mid, 0::2], torch.zeros(2, 4, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(codes[mid, mid, 1::2], torch.ones(2, 4, dtype=torch.float64), rtol=0, atol=1e-12)
        mirrored = codes.flip(1)  # left-right: x sines change sign, x cosines and every y code stay
        torch.testing.assert_close(mirrored[:, :, 2], -codes[:, :, 2], rtol=0, atol=1e-12)
        torch.testing.assert_close(mirrored[:, :, [0, 1, 3]], codes[:, :, [0, 1, 3]], rtol=0, atol=1e-12)
        torch.testing.assert_close(codes.transpose(0, 1)[:, :, 2:], codes[:, :, :2], rtol=0, atol=1e-12)  # x of (r, c) = y of (c, r)
        assert torch.unique(codes.reshape(g * g, -1), dim=0).size(0) == g * g  # no two locations share a code
    top_left = grid_positions(4)[0].view(4, -1)[:, 0]  # 2x2 grid: centre at y = x = -1/2
    torch.testing.assert_close(top_left, torch.tensor([-1.0, 0.0, -1.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="square grid"):
        grid_positions(12)


def test_positions_start_as_the_set_model_then_make_the_decoder_see_the_layout():
    feats, caps, lengths = _batch(L=9)
    feats = feats.double()
    plain, placed = _decoder().double().eval(), _decoder(positions="sincos").double().eval()
    missing = placed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["position.weight"] and not placed.position.weight.any()  # zero at the start
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(placed(feats, caps, lengths).log_probs, plain(feats, caps, lengths).log_probs,
                                   rtol=0, atol=1e-12)
        placed.position.weight.normal_(generator=torch.Generator().manual_seed(4))
        a, b = plain(feats, caps, lengths), plain(feats[:, perm], caps, lengths)
        torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=1e-12)  # the set model: any order
        a, b = placed(feats, caps, lengths), placed(feats[:, perm], caps, lengths)
    assert (a.log_probs - b.log_probs).abs().max() > 1e-3  # now the same vectors elsewhere read differently


@pytest.mark.parametrize("attention, query", [("soft", "previous"), ("hard", "previous"), ("soft", "current")])
def test_positions_train_every_parameter_and_steps_match_teacher_forcing(attention, query):
    dec = _decoder(positions="sincos", attention=attention, query=query, context_dim=4).double()
    feats, caps, lengths = _batch(L=16)
    feats = feats.double()
    out = dec(feats, caps, lengths, attend="argmax")
    caption_loss(out, caps, lambda_ds=1.0)["loss"].backward()
    assert dec.position.weight.grad.abs().sum() > 0  # zero weights still receive a gradient
    for n, p in dec.named_parameters():
        assert p.grad is not None, n
    mem = dec.init_memory(feats)
    state = dec.init_state(mem)
    for t in range(int(lengths.min()) - 1):
        o = dec.step(caps[:, t], state, mem, attend="argmax")
        torch.testing.assert_close(o.log_probs, out.log_probs[:, t], rtol=1e-10, atol=1e-12)
        state = o.state
    with pytest.raises(ValueError, match="positions"):
        _decoder(positions="learned")
    with pytest.raises(ValueError, match="positions"):
        _decoder(positions="sincos", attention="none")
    with pytest.raises(ValueError, match="square grid of locations; got L=5"):
        dec.init_memory(feats[:, :5])
