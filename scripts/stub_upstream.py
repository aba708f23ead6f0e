#!/usr/bin/env python3
"""A stub OpenAI-compatible upstream that streams a canned 4-token chat reply at once, for
measuring what wisp's proxy path itself costs (no model, no noise):

    python3 scripts/stub_upstream.py 18097 [--no-nodelay]

and a wisp with `[[models]] id = "proxied"  upstreams = ["http://127.0.0.1:18097/v1"]`.
`--no-nodelay` leaves Nagle's algorithm on, as some servers do: each small SSE write then
waits for the ACK of the one before, which a reused (keep-alive) connection delays.
Standard library only.
"""
import http.server, json, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        body = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
        self.send_response(200); self.send_header("Content-Type","application/json"); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0)); self.rfile.read(n)
        self.send_response(200); self.send_header("Content-Type","text/event-stream"); self.send_header("Transfer-Encoding","chunked"); self.end_headers()
        def send(obj):
            data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data)); self.wfile.flush()
        for i in range(4):
            send({"choices":[{"index":0,"delta":{"content":f"t{i} "},"finish_reason":None}]})
        send({"choices":[{"index":0,"delta":{},"finish_reason":"length"}]})
        send({"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":4,"total_tokens":9}})
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n"); self.wfile.flush()
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def get_request(self):
        import socket
        conn, addr = self.socket.accept()
        if "--no-nodelay" not in sys.argv:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr


S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
