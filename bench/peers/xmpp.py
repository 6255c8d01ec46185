#!/usr/bin/env python3
"""The XMPP side of bench/peers/ejabberd.sh, where tsung does not fit.

  xmpp.py register N                 users u1..uN (password pN), over ejabberd's HTTP API
  xmpp.py probe FIRST SECONDS RATE   latency probe: users uFIRST and uFIRST+1 exchange
                                     messages at RATE/s for SECONDS; prints JSON
  xmpp.py idle FIRST N SERVER_PID    N idle sessions; prints JSON with the server's memory
  xmpp.py backlog FIRST USERS PER    PER messages to each of USERS offline users (each from
                                     a sender of its own), then they log in and drain; JSON

Plain TCP on 127.0.0.1:5222, SASL PLAIN, one resource per session: the
smallest client that gives the same numbers skylark-load reports for
Skylark. Latency is measured from each message's intended send time (the
schedule), not from when it was written, as skylark-load does, so a stalled
server cannot hide its stall (coordinated omission).
"""

import asyncio
import base64
import http.client
import json
import re
import sys
import time

HOST = "127.0.0.1"
PORT = 5222
DOMAIN = "localhost"
STREAM = (
    "<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>" % DOMAIN
)


def register(n):
    conn = http.client.HTTPConnection(HOST, 5281)
    for i in range(1, n + 1):
        body = json.dumps({"user": "u%d" % i, "host": DOMAIN, "password": "p%d" % i})
        conn.request("POST", "/api/register", body)
        answer = conn.getresponse().read().decode()
        if "registered" not in answer and "already" not in answer:
            sys.exit("xmpp.py: registering u%d failed: %s" % (i, answer))


class Session:
    """One logged-in XMPP session."""

    def __init__(self, reader, writer, user):
        self.reader, self.writer, self.user = reader, writer, user
        self.buf = ""

    async def until(self, pattern):
        regex = re.compile(pattern, re.S)
        while True:
            m = regex.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("%s: the server closed the stream" % self.user)
            self.buf += data.decode("utf-8", "replace")

    def send(self, xml):
        self.writer.write(xml.encode())

    @classmethod
    async def login(cls, n, presence=True):
        user = "u%d" % n
        reader, writer = await asyncio.open_connection(HOST, PORT)
        s = cls(reader, writer, user)
        s.send(STREAM)
        await s.until(r"</stream:features>")
        creds = base64.b64encode(("\0%s\0p%d" % (user, n)).encode()).decode()
        s.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>%s</auth>" % creds)
        m = await s.until(r"<(success|failure)\b")
        if m.group(1) != "success":
            raise ConnectionError("%s: authentication failed" % user)
        s.send(STREAM)
        await s.until(r"</stream:features>")
        s.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
               "<resource>r</resource></bind></iq>")
        await s.until(r"<iq[^>]*id=['\"]b['\"][^>]*>.*?</iq>")
        if presence:
            s.send("<presence/>")
        await s.writer.drain()
        return s


def summary(samples_ms):
    if not samples_ms:
        return {"n": 0}
    xs = sorted(samples_ms)

    def q(p):
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 2)

    return {"n": len(xs), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "max_ms": round(xs[-1], 2)}


async def probe(first, seconds, rate):
    a = await Session.login(first)
    b = await Session.login(first + 1)
    total = int(seconds * rate)
    start = time.monotonic()
    latencies = []

    async def receive():
        while len(latencies) < total:
            m = await b.until(r"<body>(\d+)</body>")
            intended = start + int(m.group(1)) / 1e6
            latencies.append((time.monotonic() - intended) * 1000)

    receiver = asyncio.create_task(receive())
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        stamp = int((due - start) * 1e6)
        a.send("<message to='u%d@%s/r' type='chat'><body>%d</body></message>" % (first + 1, DOMAIN, stamp))
    try:
        await asyncio.wait_for(receiver, timeout=30)
    except asyncio.TimeoutError:
        pass
    print(json.dumps({"sent": total, "received": len(latencies), "send_to_deliver": summary(latencies)}))


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for %d" % pid)


async def idle(first, n, server_pid):
    before = rss_kib(server_pid)
    started = time.monotonic()
    sessions = []
    gate = asyncio.Semaphore(200)

    async def one(i):
        async with gate:
            sessions.append(await Session.login(i))

    await asyncio.gather(*(one(first + i) for i in range(n)))
    took = time.monotonic() - started
    await asyncio.sleep(10)
    after = rss_kib(server_pid)
    print(json.dumps({
        "connections": len(sessions),
        "connects_per_second": round(n / took),
        "server_rss_before_kib": before,
        "server_rss_after_kib": after,
        "bytes_per_connection": round((after - before) * 1024 / max(1, len(sessions))),
    }))


async def backlog(first, users, per):
    """Users uFIRST.. are offline; user k's messages come from its own
    sender, uFIRST+USERS+k (as skylark-load backlog does it)."""
    receivers = range(first, first + users)
    senders = [await Session.login(first + users + k, presence=False) for k in range(users)]
    began = time.monotonic()
    for k, sender in enumerate(senders):
        for j in range(per):
            sender.send("<message to='u%d@%s' type='chat'><body>%d</body></message>" % (receivers[k], DOMAIN, j))
    for sender in senders:
        # The offline store has a sender's messages once a round trip on its
        # stream comes back: the server handles one stream's stanzas in order.
        sender.send("<iq type='get' id='sync' to='%s'><ping xmlns='urn:xmpp:ping'/></iq>" % DOMAIN)
    for sender in senders:
        await sender.until(r"id=['\"]sync['\"]")
    stored = time.monotonic() - began
    counts = []
    gate = asyncio.Semaphore(200)

    async def drain(u):
        async with gate:
            s = await Session.login(u)
        got = 0
        while got < per:
            await s.until(r"<body>\d+</body>")
            got += 1
        counts.append(got)

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(drain(u) for u in receivers)), 600)
    took = time.monotonic() - started
    print(json.dumps({
        "messages": users * per,
        "store_seconds": round(stored, 3),
        "stored_per_second": round(users * per / stored),
        "received": sum(counts),
        "drain_seconds": round(took, 3),
        "drained_per_second": round(sum(counts) / took),
    }))


def main():
    verb, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
    if verb == "register":
        register(*args)
    elif verb == "probe":
        asyncio.run(probe(args[0], args[1], args[2]))
    elif verb == "idle":
        asyncio.run(idle(*args))
    elif verb == "backlog":
        asyncio.run(backlog(*args))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
