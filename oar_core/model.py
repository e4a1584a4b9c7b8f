"""Any-order autoregressive transformer over an H x W grid of discrete image tokens.

Sequence for an order s: inputs `[start, x_s(0), ..., x_s(N-2)]`, targets `[x_s(0), ..., x_s(N-1)]`.
Input t carries its token, the absolute 2-D position of that token, and where it must predict next: the (dy, dx)
offset to that position (`next_position: relative`, the paper's dual positional encoding), its absolute 2-D
position (`absolute`), or both; the start input carries the absolute position of s(0). With the offset alone the
first layer cannot attend near the target (attention logits are bilinear in additive embeddings), which any order
pays for and raster, whose offset is almost constant, barely does.
Because "where next" is part of the last input, every candidate next position can be scored in one forward:
the last token is repeated once per candidate, each copy attending to the cached prefix and to itself.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from oar_core.checkpoint import load_checkpoint, save_checkpoint
from oar_core.names import NEXT_POSITIONS, POLICY_HEADS
from oar_core.orders import step_of_position


@dataclass
class GPTConfig:
    grid_h: int = 7
    grid_w: int = 7
    vocab_size: int = 256
    num_classes: int = 10  # 0 = unconditional
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 192
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    policy: bool = False  # a location-policy head: where to generate next, from the prefix alone
    next_position: str = "relative"  # relative (the (dy, dx) offset) | absolute | both: how an input says where next
    policy_head: str = "shared"  # shared: a linear head whose loss also trains the trunk | own: an MLP of its own on
    # the trunk's output behind a stop-gradient, so learning where to go costs the content nothing

    @property
    def n_tokens(self) -> int:
        return self.grid_h * self.grid_w


class KVCache:
    """Per-layer keys/values of the decoded inputs in N slots: `length` committed inputs (slots [0, length)) whose
    next positions are fixed, then the rows of the latest forward (slots [length, length + T)). `append` declares
    those rows before the forward and so what they attend to: a causal continuation of the prefix (prefill), or
    `candidates`, alternatives for the next input that each see the prefix and themselves only, optionally after
    `chain` causal rows (the inputs of tokens committed together in a parallel step: seen by the candidates, and
    committed by the forward that writes them, `settle_chain`); `commit` makes the rows part of the prefix (of
    candidates, the single one of the last forward, or its first with `first`). Nothing else moves `length`.
    N slots suffice: each candidate is an unfilled position, so length + chain + C <= N."""

    def __init__(self, n_layer: int, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0
        self.rows, self.candidates, self.chain = 0, False, 0  # the rows after `length` that the next forward writes
        self.mask_TS: torch.Tensor | None = None  # what those rows see; built by the first layer that writes

    def append(self, rows: int, candidates: bool = False, chain: int = 0) -> None:
        """The next forward writes `rows` inputs after the committed prefix, replacing the last uncommitted ones;
        with `candidates`, the first `chain` of them are causal rows of the prefix, the rest candidates."""
        if self.length + rows > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length + rows} > {self.max_len}")
        self.rows, self.candidates, self.chain, self.mask_TS = rows, candidates, chain, None

    def settle_chain(self) -> None:
        """After the forward: its chain rows join the prefix; its candidates stay the uncommitted rows."""
        self.length, self.rows, self.chain = self.length + self.chain, self.rows - self.chain, 0

    def commit(self, first: bool = False) -> None:
        """The rows of the last forward join the prefix: a prefill's all, or the one chosen candidate (with `first`,
        the first of several: the next input of a parallel step's chain, which saw the prefix and itself only)."""
        if self.candidates and self.rows != 1 and not (first and self.rows > 1):
            raise ValueError(f"commit keeps one candidate; the last forward wrote {self.rows}")
        self.length += 1 if self.candidates else self.rows
        self.rows = 0

    def write(self, layer: int, k_BhTd: torch.Tensor, v_BhTd: torch.Tensor):
        """Store a layer's keys/values of the appended rows; return those of prefix + rows and the rows' mask."""
        L, T = self.length, self.rows
        if k_BhTd.shape[2] != T:
            raise ValueError(f"the forward has {k_BhTd.shape[2]} inputs; the cache was told {T} (append first)")
        if self.k[layer] is None:
            B, h, _, d = k_BhTd.shape
            self.k[layer] = k_BhTd.new_zeros(B, h, self.max_len, d)
            self.v[layer] = v_BhTd.new_zeros(B, h, self.max_len, d)
        self.k[layer][:, :, L : L + T] = k_BhTd
        self.v[layer][:, :, L : L + T] = v_BhTd
        if self.mask_TS is None:  # once per forward, by its first layer
            self.mask_TS = self.mask(k_BhTd.device)
        return self.k[layer][:, :, : L + T], self.v[layer][:, :, : L + T], self.mask_TS

    def mask(self, device) -> torch.Tensor:
        """(rows, length + rows): what each appended row attends to."""
        L, T = self.length, self.rows
        if self.candidates and self.chain:  # chain rows: causal; candidates: the prefix, the chain and themselves
            c, m = self.chain, T - self.chain
            ones = torch.ones(T, L + T, dtype=torch.bool, device=device)
            chain_rows = torch.cat([ones[:c, :L + c].tril(L), ~ones[:c, :m]], dim=1)
            return torch.cat([chain_rows, torch.cat([ones[c:, :L + c], torch.eye(m, dtype=torch.bool,
                                                                                 device=device)], 1)], 0)
        if self.candidates:  # the prefix and itself
            return torch.cat([torch.ones(T, L, dtype=torch.bool, device=device),
                              torch.eye(T, dtype=torch.bool, device=device)], dim=1)
        return torch.ones(T, L + T, dtype=torch.bool, device=device).tril(L)  # the prefix and the rows before it


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask_TT: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention, or `mask_TT`; with a cache, over the cached prefix as the cache's mask says."""
        q, k, v = rearrange(self.qkv(x_BTD), "b t (qkv h d) -> qkv b h t d", qkv=3, h=self.n_head)
        if cache is not None:
            k, v, mask_TT = cache.write(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TT, is_causal=mask_TT is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x, cache=None, layer=0, mask_TT=None):
        x = x + self.attn(self.ln1(x), cache, layer, mask_TT)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        H, W, D = cfg.grid_h, cfg.grid_w, cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.pos_row, self.pos_col = nn.Embedding(H, D), nn.Embedding(W, D)  # where this token is
        if cfg.next_position not in NEXT_POSITIONS:
            raise ValueError(f"next_position must be one of {', '.join(NEXT_POSITIONS)}, got {cfg.next_position!r}")
        if cfg.policy_head not in POLICY_HEADS:
            raise ValueError(f"policy_head must be one of {', '.join(POLICY_HEADS)}, got {cfg.policy_head!r}")
        if cfg.next_position != "absolute":  # where next is, relative
            self.off_row, self.off_col = nn.Embedding(2 * H - 1, D), nn.Embedding(2 * W - 1, D)
        # where next is, absolute: for the start input (the first position) and, unless relative only, every input
        self.start_row, self.start_col = nn.Embedding(H, D), nn.Embedding(W, D)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, D)  # last row: no class (unconditional / CFG)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        if cfg.policy:
            # query inputs: row 0 stands in for the unknown offset to the next position, row 1 for the unknown
            # first position; the policy head reads a query's output as logits over the N grid positions
            self.query_emb = nn.Embedding(2, D)
            self.policy_head = (nn.Linear(D, cfg.n_tokens) if cfg.policy_head == "shared" else
                                nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, cfg.n_tokens)))
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    # ---- inputs -------------------------------------------------------------------------------------
    def class_emb(self, labels_B: torch.Tensor) -> torch.Tensor:
        # an unconditional model has only the null row: whatever labels the data carries, it sees "no class"
        return self.cls_emb(labels_B if self.cfg.num_classes else torch.zeros_like(labels_B))

    def embed_start(self, labels_B: torch.Tensor, next_BT: torch.Tensor) -> torch.Tensor:
        W = self.cfg.grid_w
        return self.class_emb(labels_B)[:, None] + self.start_row(next_BT // W) + self.start_col(next_BT % W)

    def embed_placed(self, tok_BT: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        W = self.cfg.grid_w
        return self.tok_emb(tok_BT) + self.pos_row(pos_BT // W) + self.pos_col(pos_BT % W)

    def embed_tokens(self, tok_BT: torch.Tensor, pos_BT: torch.Tensor, next_BT: torch.Tensor) -> torch.Tensor:
        H, W = self.cfg.grid_h, self.cfg.grid_w
        x_BTD = self.embed_placed(tok_BT, pos_BT)
        if self.cfg.next_position != "absolute":
            dy, dx = next_BT // W - pos_BT // W, next_BT % W - pos_BT % W
            x_BTD = x_BTD + self.off_row(dy + H - 1) + self.off_col(dx + W - 1)
        if self.cfg.next_position != "relative":
            x_BTD = x_BTD + self.start_row(next_BT // W) + self.start_col(next_BT % W)
        return x_BTD

    def embed_query(self, labels_B: torch.Tensor, last_tok_BT: torch.Tensor | None, last_pos_BT: torch.Tensor | None):
        """Policy queries: the last placed token and its position, with "next = unknown" instead of an offset
        (the first query: the class, with "first position = unknown")."""
        if last_tok_BT is None:
            return self.class_emb(labels_B)[:, None] + self.query_emb.weight[1]
        return self.embed_placed(last_tok_BT, last_pos_BT) + self.query_emb.weight[0]

    def sequence_inputs(self, tokens_BN, order_BT, labels_B) -> torch.Tensor:
        """Inputs predicting the tokens at `order_BT[:, :T]`: start, then tokens in order (teacher forcing)."""
        tok_ord_BT = torch.gather(tokens_BN, 1, order_BT)
        start_B1D = self.embed_start(labels_B, order_BT[:, :1])
        rest_BTD = self.embed_tokens(tok_ord_BT[:, :-1], order_BT[:, :-1], order_BT[:, 1:])
        return torch.cat([start_B1D, rest_BTD], dim=1)

    # ---- forward passes -----------------------------------------------------------------------------
    def trunk(self, x_BTD: torch.Tensor, cache: KVCache | None = None, mask_TT=None):
        """Hidden states; with a cache, of the rows its `append` declared."""
        x = self.drop(x_BTD)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, mask_TT)
        return self.ln_f(x)

    def run(self, x_BTD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.head(self.trunk(x_BTD, cache))

    def forward(self, tokens_BN, order_BN, labels_B, with_policy: bool = False):
        """Teacher-forced logits for every step of `order_BN`, and the matching targets (and the policy's
        log-probs with `with_policy`; through forward() so DDP syncs the gradients)."""
        if with_policy:
            return self.forward_with_policy(tokens_BN, order_BN, labels_B)
        logits_BNV = self.run(self.sequence_inputs(tokens_BN, order_BN, labels_B))
        return logits_BNV, torch.gather(tokens_BN, 1, order_BN)

    def forward_with_policy(self, tokens_BN, order_BN, labels_B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced content logits_BNV, targets_BN, and policy log-probs_BNN: row t is the distribution
        over the positions still unfilled before step t (filled ones at -inf), from a query that sees the
        prefix (real inputs 0..t-1) and itself only, so the position it must predict, order[t], is hidden."""
        N = order_BN.shape[1]
        tok_ord_BN = torch.gather(tokens_BN, 1, order_BN)
        query_BND = torch.cat([self.embed_query(labels_B, None, None),
                               self.embed_query(labels_B, tok_ord_BN[:, :-1], order_BN[:, :-1])], dim=1)
        x_B2ND = torch.cat([self.sequence_inputs(tokens_BN, order_BN, labels_B), query_BND], dim=1)
        ones = torch.ones(N, N, dtype=torch.bool, device=order_BN.device)
        eye = torch.eye(N, dtype=torch.bool, device=order_BN.device)
        mask = torch.cat([torch.cat([ones.tril(), ~ones], 1), torch.cat([ones.tril(-1), eye], 1)], 0)
        h_B2ND = self.trunk(x_B2ND, mask_TT=mask)
        filled_BNN = step_of_position(order_BN)[:, None, :] < torch.arange(N, device=order_BN.device)[None, :, None]
        h_BND = h_B2ND[:, N:].detach() if self.cfg.policy_head == "own" else h_B2ND[:, N:]
        policy_BNN = self.policy_head(h_BND).float().masked_fill(filled_BNN, float("-inf"))
        return self.head(h_B2ND[:, :N]), tok_ord_BN, F.log_softmax(policy_BNN, dim=-1)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_tokens)

    def prefill(self, cache: KVCache, x_BTD: torch.Tensor) -> None:
        """Commit inputs whose next positions are known (inpainting's known tokens): appended causally."""
        cache.append(x_BTD.shape[1])
        self.trunk(x_BTD, cache)
        cache.commit()

    def candidate_logits(self, cache: KVCache, labels_B, last_tok_B, last_pos_B, cand_BC,
                         chain_BcD: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at the candidate next positions cand_BC in one forward (decode passes a chunk of them at a time,
        or the ones it chose); `last_tok_B is None` at the first step. `chain_BcD`: inputs not yet in the cache
        that precede the candidates (a parallel step's tokens after its first), forwarded and committed here."""
        if last_tok_B is None:
            x_BCD = self.embed_start(labels_B, cand_BC)
        else:
            C = cand_BC.shape[1]
            x_BCD = self.embed_tokens(last_tok_B[:, None].expand(-1, C), last_pos_B[:, None].expand(-1, C), cand_BC)
        return self.head(self._after_chain(cache, x_BCD, chain_BcD))

    def policy_logits(self, cache: KVCache, labels_B, last_tok_B, last_pos_B,
                      chain_BcD: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) policy logits for the next position from the cached prefix; `last_tok_B is None` at the start.
        The query row is never committed: the next forward replaces it."""
        x_B1D = self.embed_query(labels_B, None if last_tok_B is None else last_tok_B[:, None],
                                 None if last_pos_B is None else last_pos_B[:, None])
        return self.policy_head(self._after_chain(cache, x_B1D, chain_BcD))[:, 0]

    def _after_chain(self, cache: KVCache, x_BCD, chain_BcD) -> torch.Tensor:
        """Hidden states of candidate (or query) rows forwarded after the chain rows; the chain is committed, its
        outputs (nothing reads them) dropped before any head."""
        if chain_BcD is None or chain_BcD.shape[1] == 0:
            cache.append(x_BCD.shape[1], candidates=True)
            return self.trunk(x_BCD, cache)
        c = chain_BcD.shape[1]
        cache.append(c + x_BCD.shape[1], candidates=True, chain=c)
        h_BTD = self.trunk(torch.cat([chain_BcD, x_BCD], dim=1), cache)
        cache.settle_chain()
        return h_BTD[:, c:]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save_gpt(path, model: GPT, **extra) -> None:
    raw = model.module if hasattr(model, "module") else model
    save_checkpoint(path, {"config": asdict(raw.cfg), "state_dict": raw.state_dict(), **extra})


def load_gpt(path, device="cpu") -> tuple[GPT, dict]:
    ckpt = load_checkpoint(path, "model checkpoint")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not an oar model checkpoint (no config/state_dict); point to a train stage's "
                         f"model.pt")
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError) as e:  # TypeError: a config key GPTConfig does not have
        # torch's first line is only "Error(s) in loading state_dict for GPT:"; the next one names the tensor
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:300]
        raise ValueError(f"{path}: checkpoint does not match its config ({detail}); it was altered or written by "
                         f"other code: rerun the stage that produces it") from None
    return model.to(device).eval(), ckpt
