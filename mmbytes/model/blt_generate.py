"""BLT's cached generation (Pagnoni et al., 2024; the reference code re-runs the model for every byte): the entropy
model runs along the bytes with its own cache and decides, by the same rule as ``BLT.starts``, whether the next byte
opens a patch; when it does, the finished patch is pooled from the encoder states kept in the cache and the latent
transformer takes one cached step, each row at its own latent index (``Transformer.row_step``: rows advance
separately). The decoder reads the latent output of the patch its byte is in, which has seen the patches before it
only. Tested against the full forward for every byte (tests/test_blt.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbytes.model import patching
from mmbytes.model.blt_layers import BLTCache, entropy_of


class BLTGeneration:
    """``new_cache``, ``prefill`` and ``step`` of ``mmbytes.model.blt.BLT`` (mixed into it)."""

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None, *,
                  modality: Tensor | None = None) -> BLTCache:
        c = self.config
        return BLTCache(
            buf=torch.zeros(batch, max_len, dtype=torch.long, device=device), t=0,
            enc=self.encoder.make_caches(batch, max_len + 1, device, dtype),
            ent=None if self.entropy_model is None else self.entropy_model.new_cache(batch, max_len + 1, device,
                                                                                     dtype),
            glob=self.global_model.make_caches(batch, max_len + 2, device, dtype, rows=True),
            dec=self.decoder.make_caches(batch, max_len + 1, device, dtype),
            states=torch.zeros(batch, max_len, c.d_local, device=device, dtype=dtype),
            theta=self.thresholds(None if modality is None else modality.to(self.theta.device), batch).clone(),
            latent_start=self.latent_start(batch, modality, dtype or self.global_start.dtype),
            byte_start=self.byte_start(batch, modality, dtype or self.start.dtype))

    def prefill(self, prompt: Tensor, cache: BLTCache) -> Tensor:
        """Positions 0..L0 (the prompt's bytes and the next one) in one parallel pass; the logits of byte L0."""
        B, L0 = prompt.shape
        cache.buf[:, :L0] = prompt
        cache.t = L0
        x = F.pad(cache.buf[:, :L0], (0, 1))  # the byte at L0 is not known yet; no position <= L0 depends on it
        starts = self.starts(x, theta=cache.theta)
        if cache.ent is not None:  # the entropy model's cache, for the bytes to come
            cache.entropy = entropy_of(self.entropy_model.prefill(x[:, :L0], cache.ent))
        pid = starts.long().cumsum(1) - 1  # (B, L0 + 1)
        done = pid[:, L0]  # patches finished before byte L0 (L0's own patch index)
        h = self.encoder(self.embed_bytes(x[:, :L0]), cache.enc) if L0 else x.new_zeros(B, 0, self.config.d_local,
                                                                                          dtype=cache.states.dtype)
        cache.states[:, :L0] = h
        p = h.new_zeros(B, 0, self.config.d_global)
        if L0:  # every patch the prompt touches is pooled; the latent model takes the finished ones
            p = self.patch_vectors(h, pid[:, :L0], int(pid[:, L0 - 1].max()) + 1)[:, : int(done.max())]
        g_in = torch.cat([cache.latent_start.to(h.dtype), p], dim=1)  # (B, max done + 1, D)
        for c in cache.glob:
            c.set_lengths(done + 1)
        g = self.global_model(g_in, cache.glob)
        rows = torch.arange(B, device=g.device)
        kv = self.latent_keys(g)
        cache.kv = [(key[rows, done][:, None], val[rows, done][:, None]) for key, val in kv]  # byte L0's patch
        cache.count = done + 1
        cache.start = patching.latest_start(starts)[:, L0]
        d = torch.cat([cache.byte_start.to(h.dtype), h], dim=1)  # (B, L0 + 1, D_L)
        return self.head(self.decode(d, kv, pid, cache.dec)[:, -1])

    def step(self, byte: Tensor, cache: BLTCache) -> Tensor:
        """Append one byte per row (B,); return the logits of the byte after it."""
        t = cache.t
        cache.buf[:, t] = byte
        cache.t = t + 1
        lo = max(0, t + 1 - max(self.config.hash_ngrams, default=1))
        h = self.encoder(self.embed_bytes(cache.buf[:, lo : t + 1])[:, -1:], cache.enc)  # (B, 1, D_L)
        cache.states[:, t] = h[:, 0]
        opens = self._opens(byte, cache)  # does byte t + 1 start a patch
        if bool(opens.any()):  # pool each opening row's finished patch start..t; one latent step for those rows
            first = int(cache.start[opens].min())
            mine = torch.arange(first, t + 1, device=h.device) >= cache.start[:, None]  # (B, L) bytes of the patch
            p = self.patch_vectors(cache.states[:, first : t + 1], (~mine).long(), 2)[:, :1]  # patch 0: its bytes
            g = self.global_model.row_step(p, cache.glob, cache.count, opens)  # each row at its own latent index
            now = opens.view(-1, 1, 1, 1, 1)  # the decoder's keys change only where a patch opened
            cache.kv = [(torch.where(now, key, old_key), torch.where(now, val, old_val))
                        for (key, val), (old_key, old_val) in zip(self.latent_keys(g), cache.kv, strict=True)]
            cache.count = cache.count + opens.long()
            cache.start = torch.where(opens, t + 1, cache.start)
        zero = torch.zeros(h.shape[0], 1, dtype=torch.long, device=h.device)
        return self.head(self.decode(h, cache.kv, zero, cache.dec)[:, -1])

    def _opens(self, byte: Tensor, cache: BLTCache) -> Tensor:
        """Whether byte t + 1 (t: the byte just appended) starts a patch, by the same rule as ``starts``."""
        c, t = self.config, cache.t - 1
        if c.uses_entropy:
            prev = cache.entropy
            cache.entropy = entropy_of(self.entropy_model.step(byte, cache.ent))
            h = torch.stack([prev, cache.entropy], dim=1)  # the rules look back one position at most
            opens = patching.ENTROPY_RULES[c.patching](h, cache.theta)[:, 1]
        elif c.patching == "fixed":
            opens = torch.full_like(byte, (t + 1) % int(c.patch_size) == 0, dtype=torch.bool)
        else:
            opens = patching.spacelike_starts(F.pad(cache.buf[:, max(0, t - 1) : t + 1], (0, 1)))[:, -1]
        if c.max_patch_len:
            opens = opens | (t + 1 - cache.start >= c.max_patch_len)
        return opens
