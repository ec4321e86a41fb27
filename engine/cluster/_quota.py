"""The RPM/TPM quota of an upstream, shared by every process through Redis: at most ``rpm`` requests and
``tpm`` tokens in any 60-second window, across all of them.

The window log of :mod:`engine._rate_window` lives in one Redis key, and one Lua script does all of an
acquire on the server in a single step (expire, correct, merge, reserve), so two processes can never
both take the last request. Taking reserves the first instant that fits, after every reservation made
before (first come, first served across the cluster); a wait that would not end, with the call's
typical duration after it and the Redis round-trip counted, before the caller's deadline reserves
nothing and fails at once. One round-trip per acquire, three Redis commands (EVALSHA, GET, SET);
corrections (TPM's real usage, a call never sent) ride along with the next one, or the heartbeat.

"Now" is an argument of the script, read from the caller's clock: wall time in production (processes on
different hosts agree on it within NTP's error), Trio's clock in tests, where a ``MockClock`` drives the
shared log exactly.

What nobody knows is assumed to have happened at the worst moment:

- **Redis loses the log** (FLUSHALL, a restart without persistence): the log is recreated with the whole
  quota marked used at that instant (a missing log never starts full), in a new *epoch*. Every process
  that knew the old epoch sends its own grants of the last minute (each process keeps them, see
  ``mirror``; at its next call, or its heartbeat when idle), which replace as much of the unknown at
  their real times, so that they leave the window when they really do. Once as many processes have
  sent theirs as the most that any of them counted at its last heartbeats (counts that never drop at
  once, so a count rebuilding itself after the loss does not shrink it), nothing is unknown any more;
  until then, what no process sent leaves the window a minute after the loss (a process gone since the
  loss, for one). A process that never reached Redis starts a missing log empty (a new deployment).
- **Redis is unreachable**: each process falls back to a local window with its share of the quota (the
  quota divided by the processes counted at the last heartbeat), holding its own grants of the last
  minute and, for the others', what the shared log last told it was still free, split evenly: across all
  processes the upstream sees at most the quota meanwhile. When Redis answers again, the grants made
  locally are sent to the shared log (charged back), and the local share stays in force for one more
  minute, until every process's local grants are in the shared log.
"""

from __future__ import annotations

import math
import os
from typing import Any

import attrs
import trio

from .._rate_window import WINDOW, Entry, LocalGrant, LocalQuota, WindowLog, refuse
from ._redis import RedisLink, RedisUnavailableError

# KEYS[1] = the log. ARGV[1] = numbers separated by spaces (one argument: the client's cost is per
# argument): now, rpm (0: none), tpm (0: none), the processes the caller counts, requests and tokens to
# take (0 and 0: only corrections and merges), the bound of a wait, 1 if this is the caller's first
# call in the epoch (else 0), the number of corrections and of merged grants, then each correction as
# (seq, requests, tokens) and each merged grant as (time, requests, tokens). ARGV[2] = the epoch the
# caller knows ('' : none), ARGV[3] = the epoch of a log this call creates, ARGV[4] = the caller's id.
# Replies {'epoch', epoch} (nothing done: the caller must resend under that epoch), or
# {'ok' | 'wait', epoch, wait, seq, requests, tokens}: 'ok' took it (at now + wait), 'wait' took nothing
# (a wait that does not end before its bound); requests and tokens are the window's totals. Numbers travel
# as strings with 17 digits (Lua numbers would be truncated to integers, tostring keeps 14).
#
# The value: a 4-byte length, a msgpack header {ep = epoch, sq = last seq, rn/rw = the entries' requests and
# tokens, sn/sw = requests/tokens of unknown use at time su (after a loss), mg = the processes that have
# sent their own grants since, nd = as many as must have}, then the entries, oldest first, 40 bytes each:
# time, requests, tokens, first seq, last seq (doubles; seqs -1 for grants sent after a loss or an outage).
# An acquire decodes the header, the oldest entries (expiry, and the walk to the first instant that fits)
# and the newest (merge, recent corrections) only, and copies the rest as it is. Grants closer than (just
# under) 60 / rpm seconds, at least 60 / 2048, to the newest entry are merged into it
# (engine/_rate_window.py's merge_gap): a log holds at most about rpm (or 2,048) entries, and a client at
# exactly the quota's pace is never merged.
QUOTA_SCRIPT = """
local WINDOW = 60
local TTL_MS = 86400000
local REC = 40
local x = {}
for number in string.gmatch(ARGV[1], '%S+') do x[#x + 1] = tonumber(number) end
local now, rpm, tpm, processes = x[1], x[2], x[3], x[4]
local want_n, want_w, max_wait, first = x[5], x[6], x[7], x[8] == 1
local corrections, merges = x[9], x[10]
local known, pid = ARGV[2], ARGV[4]
local gap = 60 / 2048
if rpm > 0 and 0.999 * 60 / rpm > gap then gap = 0.999 * 60 / rpm end
local function fmt(x) return string.format('%.17g', x) end

local raw = redis.call('GET', KEYS[1])
local st
local base = 1
local count = 0
if raw then
  local size = struct.unpack('<I4', raw, 1)
  st = cmsgpack.unpack(string.sub(raw, 5, 4 + size))
  base = 5 + size
  count = (#raw - base + 1) / REC
else
  raw = ''
  st = {ep = ARGV[3], sq = 0, rn = 0, rw = 0, sn = 0, sw = 0, su = now, nd = 0, mg = {}}
  if known ~= '' then
    st.sn = rpm
    st.sw = tpm
    st.nd = processes
  end
end

-- Entries head .. split - 1 are read from raw as they are; split .. count - 1 are in tail (changed).
local head = 0
local split = count
local tail = {}
local function entry(i)
  if i < split then return struct.unpack('<ddddd', raw, base + i * REC) end
  local e = tail[i - split + 1]
  return e[1], e[2], e[3], e[4], e[5]
end
local function open(j)
  while split > j do
    split = split - 1
    local t, n, w, f, l = struct.unpack('<ddddd', raw, base + split * REC)
    table.insert(tail, 1, {t, n, w, f, l})
  end
end
local function save()
  local parts = {'', cmsgpack.pack(st), string.sub(raw, base + head * REC, base + split * REC - 1)}
  parts[1] = struct.pack('<I4', #parts[2])
  for _, e in ipairs(tail) do
    parts[#parts + 1] = struct.pack('<ddddd', e[1], e[2], e[3], e[4], e[5])
  end
  redis.call('SET', KEYS[1], table.concat(parts), 'PX', TTL_MS)
end
if st.ep ~= known then
  if raw == '' then save() end
  return {'epoch', st.ep}
end
local function insert(t, n, w)
  local i = count
  while i > head and entry(i - 1) > t do i = i - 1 end
  open(i)
  table.insert(tail, i - split + 1, {t, n, w, -1, -1})
  count = count + 1
  st.rn = st.rn + n
  st.rw = st.rw + w
end

while head < count do
  local t, n, w = entry(head)
  if t + WINDOW > now then break end
  st.rn = st.rn - n
  st.rw = st.rw - w
  head = head + 1
end
if head == count then st.rn, st.rw = 0, 0 end
if st.su + WINDOW <= now then
  st.sn, st.sw, st.nd, st.mg = 0, 0, 0, {}
end

local a = 11
for _ = 1, corrections do
  local seq, dn, dw = x[a], x[a + 1], x[a + 2]
  a = a + 3
  local found = false
  local j = count - 1
  while j >= head do
    local _, _, _, f, l = entry(j)
    if f <= seq and seq <= l then
      open(j)
      local e = tail[j - split + 1]
      local n, w = math.max(0, e[2] + dn), math.max(0, e[3] + dw)
      st.rn = st.rn + n - e[2]
      st.rw = st.rw + w - e[3]
      e[2], e[3] = n, w
      found = true
      break
    end
    if l >= 0 and l < seq then break end
    j = j - 1
  end
  if not found and dw > 0 then insert(now, 0, dw) end
end

local unknown = st.sn > 0 or st.sw > 0
local counted = false
if first and unknown then
  for _, p in ipairs(st.mg) do
    if p == pid then counted = true end
  end
end
for _ = 1, merges do
  local t, mn, mw = x[a], x[a + 1], x[a + 2]
  a = a + 3
  if t + WINDOW > now then
    insert(t, mn, mw)
    if first and not counted then
      st.sn = math.max(0, st.sn - mn)
      st.sw = math.max(0, st.sw - mw)
    end
  end
end
if first and unknown and not counted then
  st.mg[#st.mg + 1] = pid
  if processes > st.nd then st.nd = processes end
  if #st.mg >= st.nd then st.sn, st.sw, st.nd, st.mg = 0, 0, 0, {} end
end

local status, wait, seq = 'ok', 0, 0
if want_n > 0 or want_w > 0 then
  local start = now
  if count > head then
    local latest = entry(count - 1)
    if latest > start then start = latest end
  end
  local over_n, over_w = -1, -1
  if rpm > 0 then over_n = st.rn + st.sn + want_n - rpm end
  if tpm > 0 then over_w = st.rw + st.sw + want_w - tpm end
  local grant = start
  if over_n > 0 or over_w > 0 then
    grant = math.huge
    local freed_n, freed_w = 0, 0
    local unknown = st.sn > 0 or st.sw > 0
    local i = head
    while true do
      local t, fn, fw
      if unknown and (i >= count or st.su <= entry(i)) then
        t, fn, fw = st.su, st.sn, st.sw
        unknown = false
      elseif i < count then
        t, fn, fw = entry(i)
        i = i + 1
      else
        break
      end
      freed_n = freed_n + fn
      freed_w = freed_w + fw
      if freed_n >= over_n and freed_w >= over_w then
        grant = math.max(start, t + WINDOW)
        break
      end
    end
  end
  wait = grant - now
  if wait > 0 and wait >= max_wait then
    status = 'wait'
  else
    st.sq = st.sq + 1
    seq = st.sq
    local merged = false
    if count > head then
      local t, _, _, f = entry(count - 1)
      if grant - t < gap and f >= 0 then
        open(count - 1)
        local e = tail[#tail]
        e[1], e[2], e[3], e[5] = math.max(t, grant), e[2] + want_n, e[3] + want_w, seq
        merged = true
      end
    end
    if not merged then
      tail[#tail + 1] = {grant, want_n, want_w, seq, seq}
      count = count + 1
    end
    st.rn = st.rn + want_n
    st.rw = st.rw + want_w
  end
end
save()
return {status, st.ep, fmt(wait), tostring(seq), fmt(st.rn + st.sn), fmt(st.rw + st.sw)}
"""

KEY_TTL = 86400.0  # seconds a log outlives its last write (TTL_MS in the script)
_LONGEST_WAIT = 1e9  # "no deadline", as a number Lua can read
_RESENDS = 3  # epoch changes one acquire follows before it gives up on the shared log
_SENDING = "\x00sending"  # the tag of a mirror entry a call is sending to the shared log


@attrs.frozen
class Reply:
    """The script's answer."""

    status: str  # "ok", "wait" or "epoch"
    epoch: str
    wait: float = 0.0
    seq: int = 0
    requests: float = 0.0  # the window's totals after the call
    tokens: float = 0.0

    @classmethod
    def parse(cls, raw: Any) -> Reply:
        if raw[0] == "epoch":
            return cls("epoch", str(raw[1]))
        return cls(str(raw[0]), str(raw[1]), float(raw[2]), int(raw[3]), float(raw[4]), float(raw[5]))


class SharedGrant:
    """One call's request and tokens, taken from the shared log."""

    __slots__ = ("_entry", "_epoch", "_estimate", "_quota", "_seq", "_settled")

    def __init__(self, quota: SharedQuota, seq: int, epoch: str, entry: Entry, estimate: float) -> None:
        self._quota = quota
        self._seq = seq
        self._epoch = epoch
        self._entry = entry
        self._estimate = estimate
        self._settled = False

    def commit(self, tokens: float | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        if tokens is not None:
            self._quota._correct(self._seq, self._epoch, self._entry, 0.0, tokens - self._estimate)

    def refund(self) -> None:
        if self._settled:
            return
        self._settled = True
        self._quota._correct(self._seq, self._epoch, self._entry, -1.0, -self._estimate)


class ShareGrant:
    """One call's request and tokens, taken from this process's local share (Redis unreachable)."""

    __slots__ = ("_entry", "_estimate", "_local", "_mirror", "_settled")

    def __init__(self, local: LocalGrant, mirror: WindowLog, entry: Entry, estimate: float) -> None:
        self._local = local
        self._mirror = mirror
        self._entry = entry
        self._estimate = estimate
        self._settled = False

    def commit(self, tokens: float | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        self._local.commit(tokens)
        if tokens is not None:
            self._mirror.correct(self._entry, 0.0, tokens - self._estimate)

    def refund(self) -> None:
        if self._settled:
            return
        self._settled = True
        self._local.refund()
        self._mirror.correct(self._entry, -1.0, -self._estimate)


class SharedQuota:
    """``rpm`` requests and ``tpm`` tokens in any 60 seconds, shared through Redis (see the module
    docstring). Satisfies the :class:`engine._limits.Quota` port.

    Args:
        link: The process's Redis link.
        upstream: The upstream's name (the key is ``prefix:quota:upstream``).
        rpm: Requests per window, or None.
        tpm: Tokens per window, or None.
    """

    def __init__(self, link: RedisLink, upstream: str, rpm: float | None, tpm: float | None) -> None:
        if not (rpm or tpm):
            raise ValueError("a quota needs a request or a token limit")
        self._link = link
        self.name = upstream
        self.rpm = rpm or 0.0
        self.tpm = tpm or 0.0
        self.key = link.key("quota", upstream)
        self._script = link.client.register_script(QUOTA_SCRIPT)
        # This process's own grants of the last minute (Trio's clock), each tagged with the epoch of the
        # shared log that holds it ("": none yet): what it sends when the log was lost, or after an outage.
        self.mirror = WindowLog()
        self.epoch = ""  # the shared log's epoch this process knows
        self._candidate = os.urandom(8).hex()  # the epoch of a log this process would create
        self._first_in_epoch = False
        self._last_contact = -math.inf  # the shared clock at the last answer
        self._usage: tuple[float, float] | None = None  # the window's totals at the last answer
        self._corrections: list[tuple[int, float, float]] = []  # (seq, requests, tokens) of this epoch
        self._unmerged: list[Entry] = []  # may hold mirror entries the shared log lacks (see _take_unmerged)
        self._share: LocalQuota | None = None  # the local share, while Redis is (or just was) unreachable
        self._share_until = -math.inf  # when Redis answers again: the share's last minute ends then
        self._waited = 0.0

    def __repr__(self) -> str:
        return f"<SharedQuota {self.key} [{self.rpm:g} rpm, {self.tpm:g} tpm]>"

    @property
    def max_tokens(self) -> float:
        return self.tpm or math.inf

    @property
    def waited(self) -> float:
        return self._waited + (self._share.waited if self._share is not None else 0.0)

    # --- acquiring ---------------------------------------------------------------------------------

    async def acquire(self, tokens: float, *, then: float = 0.0) -> SharedGrant | ShareGrant:
        """Take one request and ``tokens`` from the shared log, waiting for them within the caller's
        deadline (``then`` seconds must still fit after the wait).

        Blocks for one Redis round-trip (at most ``call_timeout``; two when the log was just lost) and
        then for the wait, if any. While Redis is unreachable, the local share decides, without Redis.

        Raises:
            RateLimitWaitError: at once, when the wait and ``then`` could not end before the deadline.
        """
        if self._share_in_force():
            return await self._acquire_share(tokens, then)
        try:
            return await self._acquire_shared(tokens, then)
        except RedisUnavailableError:
            return await self._acquire_share(tokens, then)

    async def _acquire_shared(self, tokens: float, then: float) -> SharedGrant:
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled scope's -inf deadline is no refusal
        for _ in range(_RESENDS):
            started = trio.current_time()
            left = trio.current_effective_deadline() - started
            max_wait = left - then - self._link.rtt if math.isfinite(left) else _LONGEST_WAIT
            reply = await self._run(1.0, tokens, max_wait)
            if reply.status != "epoch":
                break
        else:
            raise RedisUnavailableError(f"{self.key}: the shared log changed epoch {_RESENDS} times")
        if reply.status == "wait":
            await trio.lowlevel.checkpoint_if_cancelled()  # cancelled meanwhile: that, not a refusal
            raise refuse(self.name, reply.wait)
        at = started + reply.wait
        if reply.wait > 0 and at + then >= trio.current_effective_deadline():  # the round trip ate it
            self._corrections.append((reply.seq, -1.0, -tokens))
            await trio.lowlevel.checkpoint_if_cancelled()  # cancelled meanwhile: that, not a refusal
            raise refuse(self.name, at - trio.current_time())
        self.mirror.expire(trio.current_time())
        grant = SharedGrant(
            self, reply.seq, reply.epoch, self.mirror.add(at, 1.0, tokens, reply.epoch), tokens
        )
        if at > trio.current_time():  # else the round trip was the checkpoint
            try:
                await trio.sleep_until(at)
            except BaseException:
                grant.refund()
                raise
            finally:
                self._waited += trio.current_time() - started
        return grant

    def _share_in_force(self) -> bool:
        """Whether the local share decides: Redis is unreachable, or answered again less than a minute
        ago (until every process's local grants reached the shared log)."""
        if self._link.degraded:
            return True
        if self._share is None:
            return False
        now = trio.current_time()
        if self._share_until == -math.inf:
            self._share_until = now + WINDOW
        if now < self._share_until:
            return True
        self._share, self._share_until = None, -math.inf
        return False

    async def _acquire_share(self, tokens: float, then: float) -> ShareGrant:
        share = self._share if self._share is not None else self._open_share()
        local = await share.acquire(tokens, then=then)
        now = trio.current_time()
        self.mirror.expire(now)
        entry = self.mirror.add(now, 1.0, tokens, "")
        self._unmerged.append(entry)
        return ShareGrant(local, self.mirror, entry, tokens)

    def _open_share(self) -> LocalQuota:
        """The local share: quota / processes, holding this process's own grants of the last minute and,
        once the shared log was reached, the others' possible use of what it last saw free."""
        processes = max(1, self._link.processes)
        rpm, tpm = self.rpm / processes, self.tpm / processes
        share = LocalQuota(f"{self.name} (local share)", rpm or None, tpm or None)
        now = trio.current_time()
        self.mirror.expire(now)
        for entry in self.mirror:
            share.log.insert(entry.at, entry.requests, entry.tokens, "own")
        if self._usage is not None:
            used_requests, used_tokens = self._usage
            free_requests = max(0.0, self.rpm - used_requests) / processes
            free_tokens = max(0.0, self.tpm - used_tokens) / processes
            unknown_requests = max(0.0, rpm - self.mirror.requests - free_requests) if rpm else 0.0
            unknown_tokens = max(0.0, tpm - self.mirror.tokens - free_tokens) if tpm else 0.0
            if unknown_requests or unknown_tokens:
                share.log.insert(now, unknown_requests, unknown_tokens, "unknown")
        self._share, self._share_until = share, -math.inf
        return share

    # --- talking to the script ---------------------------------------------------------------------

    def _take_unmerged(self) -> list[Entry]:
        """The mirror's grants the shared log lacks (made locally, or before the log was lost), marked
        as being sent: a call running meanwhile does not send them too."""
        candidates, self._unmerged = self._unmerged, []
        taken = [
            e
            for e in dict.fromkeys(candidates)
            if e.alive and e.tag not in (self.epoch, _SENDING) and (e.requests or e.tokens)
        ]
        return taken

    def _correct(self, seq: int, epoch: str, entry: Entry, requests: float, tokens: float) -> None:
        """Change a shared grant's charge: in the mirror now, in the shared log with the next call."""
        self.mirror.correct(entry, requests, tokens)
        if epoch == self.epoch and (requests or (tokens and self.tpm)):  # tokens count only with a limit
            self._corrections.append((seq, requests, tokens))

    async def _run(self, requests: float, tokens: float, max_wait: float) -> Reply:
        """One call of the script with what is queued (corrections, grants the shared log lacks).
        Blocks for one bounded round-trip.

        Raises:
            RedisUnavailableError: Redis did not answer (what was queued stays queued).
        """
        link = self._link
        now_local, now = trio.current_time(), link.clock()
        known = self.epoch if now - self._last_contact < KEY_TTL else ""
        corrections = self._corrections
        self.mirror.expire(now_local)
        unmerged = self._take_unmerged()
        tags = [e.tag for e in unmerged]
        for entry in unmerged:  # a call running meanwhile must not send them too
            entry.tag = _SENDING
        first, self._first_in_epoch = self._first_in_epoch, False  # this call brings the grants
        numbers = [
            now,
            self.rpm,
            self.tpm,
            max(1, link.processes),
            requests,
            tokens,
            min(max_wait, _LONGEST_WAIT),
            1 if first else 0,
            len(corrections),
            len(unmerged),
        ]
        for correction in corrections:
            numbers += correction
        for entry in unmerged:
            numbers += (now + (entry.at - now_local), entry.requests, entry.tokens)
        args = (" ".join(map(repr, numbers)), known, self._candidate, link.process_id)
        self._corrections = []
        try:
            reply = Reply.parse(await link.call(lambda: self._script(keys=[self.key], args=args)))
        except BaseException:
            self._corrections = corrections + self._corrections  # not applied: keep them for the next call
            for entry, tag in zip(unmerged, tags, strict=True):
                entry.tag = tag
            self._unmerged += unmerged
            self._first_in_epoch = self._first_in_epoch or first
            raise
        self._last_contact = now
        if reply.status == "epoch":
            self._corrections = []  # they belong to the old epoch (the mirror holds their effect)
            for entry, tag in zip(unmerged, tags, strict=True):
                entry.tag = tag
            self.epoch, self._first_in_epoch = reply.epoch, True
            self._candidate = os.urandom(8).hex()
            self._unmerged = list(self.mirror)  # none of them is in the log of this epoch
            return reply
        for entry in unmerged:
            entry.tag = reply.epoch
        self._usage = (reply.requests, reply.tokens)
        return reply

    async def flush(self, idle_after: float) -> None:
        """Send what is queued, and if this process has not talked to the shared log for ``idle_after``
        seconds, check in anyway (so that a lost log learns its grants within a heartbeat). The
        heartbeat calls this. Blocks for one or two bounded round-trips."""
        if self._link.degraded:
            return
        self.mirror.expire(trio.current_time())
        queued = self._corrections or any(
            e.alive and e.tag not in (self.epoch, _SENDING) for e in self._unmerged
        )
        if not queued and self._link.clock() - self._last_contact < idle_after:
            return
        try:
            for _ in range(_RESENDS):
                if (await self._run(0.0, 0.0, 0.0)).status != "epoch":
                    return
        except RedisUnavailableError:
            return

    async def usage(self) -> tuple[float, float]:
        """The shared window's requests and tokens now (tests, diagnostics). Blocks for one round-trip.

        Raises:
            RedisUnavailableError: Redis did not answer.
        """
        for _ in range(_RESENDS):
            reply = await self._run(0.0, 0.0, 0.0)
            if reply.status != "epoch":
                return reply.requests, reply.tokens
        raise RedisUnavailableError(f"{self.key}: the shared log changed epoch {_RESENDS} times")
