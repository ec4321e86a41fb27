"""The Lua script of the shared RPM/TPM window (``engine/cluster/_quota.py``) and its answer.

The script is the window of ``engine/_rate_window.py`` on the server: the same expiry, merge gap, first
instant that fits and corrections, so that a process sees the same grants through Redis as alone
(tests/test_cluster_limits.py checks it against the local window on random interleavings), plus what
only a shared log needs: epochs (a log Redis lost and recreated), the grants processes send to it after
a loss or an outage, and the unknown use of a lost minute.
"""

from __future__ import annotations

from typing import Any

import attrs

# KEYS[1] = the log. ARGV[1] = numbers separated by spaces (one argument: the client's cost is per
# argument): rpm (0: none), tpm (0: none), the processes the caller counts, requests and tokens to take
# (0 and 0: only corrections and merges), the bound of a wait, 1 if this is the caller's first call in
# the epoch (else 0), the number of corrections and of merged grants, the seconds after a loss before
# which its unknown use is never freed by a count (three heartbeat intervals: every live process has
# beaten since), then each correction as (seq, requests, tokens) and each merged grant as (age,
# requests, tokens): how many seconds before the call it was made (negative: a reservation still to
# come). ARGV[2] = the epoch the caller knows ('' : none), ARGV[3] = the epoch of a log this call
# creates, ARGV[4] = the caller's id, ARGV[5] = '' (tests only: a stand-in for TIME, in seconds).
# "Now" is Redis's own clock (TIME): no process sends an instant, only durations, so a process whose
# clock is off changes nothing.
# Replies {'epoch', epoch} (nothing done: the caller must resend under that epoch), or
# {'ok' | 'wait', epoch, wait, seq, requests, tokens}: 'ok' took it (at now + wait), 'wait' took nothing
# (a wait that does not end before its bound); requests and tokens are the window's totals. Numbers travel
# as strings with 17 digits (Lua numbers would be truncated to integers, tostring keeps 14).
#
# The value: a 4-byte length, a msgpack header {ep = epoch, sq = last seq, rn/rw = the entries' requests and
# tokens, sn/sw = requests/tokens of unknown use at time su (after a loss), mg = the processes that have
# sent their own grants since (each replaces the unknown once), nd = the most processes a caller counted
# since, fr = made by a process that knew no log, fs = the processes that made their first call to it},
# then the entries, oldest first, 40 bytes each:
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
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local rpm, tpm, processes = x[1], x[2], x[3]
local want_n, want_w, max_wait, first = x[4], x[5], x[6], x[7] == 1
local corrections, merges, settle = x[8], x[9], x[10]
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
  else
    st.fr = true
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
  if known ~= '' and st.fr then
    -- Made by a process that knew no log, which cannot tell a lost log from a new deployment's; this
    -- caller knew one: it was lost, and the minute before is unknown (on top of what is logged since).
    -- The processes that made their first call to it already sent their grants: they are logged.
    st.fr = nil
    st.sn, st.sw, st.su, st.nd, st.mg = rpm, tpm, now, 0, st.fs or {}
    st.fs = nil
    save()
  elseif raw == '' then
    save()
  end
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
  local t, mn, mw = now - x[a], x[a + 1], x[a + 2]
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
end
if first and st.fr then
  -- A first call to a log made by a process that knew no log: if a process that knew the lost one
  -- marks the minute unknown later, this one has sent its grants already (see above).
  st.fs = st.fs or {}
  local seen = false
  for _, p in ipairs(st.fs) do
    if p == pid then seen = true end
  end
  if not seen then st.fs[#st.fs + 1] = pid end
end
-- Every process has sent its grants once as many have as the most any caller counted since the loss,
-- provided the counts are of heartbeats made since: every live process has beaten again (a count of
-- heartbeats before that may lack a process that joined just before the loss).
if unknown then
  if processes > st.nd then st.nd = processes end
  if #st.mg >= st.nd and now >= st.su + settle then st.sn, st.sw, st.nd, st.mg = 0, 0, 0, {} end
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
