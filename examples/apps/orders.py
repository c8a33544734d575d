#!/usr/bin/env python3
"""Ferry quickstart app (Python standard library only).

Run it next to a sidecar:
    ferry-sidecar run --app-id orders --app-port 3000 \
        --resources examples/quickstart -- python3 examples/apps/orders.py

It produces ten orders to the `orders` topic and receives them back on
/orders, answering:
  * 200            most orders                      -> acked
  * 202 + callback orders 3, 6 and 9                -> acked later via POST /v1/deliveries/{id}/ack
  * 503 once       order 4 (Retry-After: 1)         -> retried after a second, then acked
  * 422            order 7 (negative amount)        -> dead-lettered to orders-dlq
and prints the dead letter it receives on /dead-letters. It exits once all
ten are settled (status 0), or after 60 s (status 1); with --stay it keeps
running until Ctrl-C, for the README's curl walkthrough.
"""
import json
import os
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FERRY_URL = os.environ.get("FERRY_URL", "http://127.0.0.1:7600")
APP_PORT = int(os.environ.get("FERRY_APP_PORT", "3000"))
ORDERS = 10

lock = threading.Lock()
acked, dead, retried = set(), set(), set()
done = threading.Event()


print_lock = threading.Lock()


def say(msg):
    with print_lock:
        print(f"[app] {msg}", flush=True)


def post(path, body=b"", headers=None):
    req = urllib.request.Request(FERRY_URL + path, data=body, method="POST", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read() or b"{}")


def settled():
    with lock:
        if len(acked) + len(dead) >= ORDERS:
            done.set()


def ack_later(order, delivery_id):
    time.sleep(0.3)
    status, _ = post(f"/v1/deliveries/{delivery_id}/ack")
    say(f"{order}: acked via callback (HTTP {status})")
    with lock:
        acked.add(order)
    settled()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, headers=None, body=b""):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        order = self.headers.get("ce-id")
        attempt = int(self.headers.get("ferry-attempt", "1"))
        if self.path == "/dead-letters":
            order = self.headers.get("ferry-origin-id")  # the letter's own id is "{subscription}:{id}"
            say(f"dead letter: {order} from subscription {self.headers.get('ferry-origin-subscription')} after "
                f"{self.headers.get('ferry-attempts')} attempt(s): {self.headers.get('ferry-last-status')} "
                f"{self.headers.get('ferry-last-error')}")
            with lock:
                dead.add(order)
            self.answer(200)
            settled()
            return
        data = json.loads(body)
        n = data["n"]
        if data["amount"] < 0:
            say(f"{order} (attempt {attempt}): 422, amount must be positive -> dead letter")
            self.answer(422, body=b"amount must be positive")
        elif n == 4 and attempt == 1:
            say(f"{order} (attempt {attempt}): 503 busy, Retry-After 1 -> retried later")
            with lock:
                retried.add(order)
            self.answer(503, {"retry-after": "1"})
        elif n % 3 == 0:
            say(f"{order} (attempt {attempt}): 202, will ack in 300 ms")
            self.answer(202)
            threading.Thread(target=ack_later, args=(order, self.headers["ferry-delivery-id"]), daemon=True).start()
        else:
            say(f"{order} (attempt {attempt}): 200 -> acked (customer {self.headers.get('ferry-key')})")
            self.answer(200)
            with lock:
                acked.add(order)
            settled()


def main():
    server = ThreadingHTTPServer(("127.0.0.1", APP_PORT), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    say(f"listening on 127.0.0.1:{APP_PORT}, sidecar at {FERRY_URL}")
    for n in range(1, ORDERS + 1):
        order = {"n": n, "amount": -5 if n == 7 else 10 * n, "customer": f"c{n % 3}"}
        status, reply = post("/v1/topics/orders/messages", json.dumps(order).encode(),
                             {"content-type": "application/json", "ferry-id": f"order-{n}",
                              "ferry-key": order["customer"]})
        say(f"produced order-{n} -> HTTP {status}, offset {reply.get('offset')} ({reply.get('status')})")
    if not done.wait(60):
        say(f"timed out: {len(acked)} acked, {len(dead)} dead-lettered")
        sys.exit(1)
    time.sleep(0.2)  # let the last callback's answer print
    with lock:
        say(f"done: {len(acked)} acked, {len(dead)} dead-lettered, {len(retried)} retried")
    if "--stay" in sys.argv:
        say("staying up for the curl walkthrough in README.md; Ctrl-C to stop")
        threading.Event().wait()
    server.shutdown()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        say("stopped")
        sys.exit(0 if "--stay" in sys.argv else 130)
