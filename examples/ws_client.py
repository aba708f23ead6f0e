"""The WebSocket chat (GET /v1/chat/ws) from Python (pip install websockets).

    python examples/ws_client.py "Tell me a story."     # WISP_URL / WISP_KEY override

Sends one chat frame, prints the deltas as they arrive, cancels after 40 deltas (to show
the cancel frame), and prints the `done` frame with the usage.
"""
import asyncio
import json
import os
import sys

import websockets


async def main(prompt: str) -> None:
    url = os.environ.get("WISP_URL", "http://127.0.0.1:8080").replace("http", "ws", 1) + "/v1/chat/ws"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        print(json.loads(await ws.recv()))  # {"type": "pong"}
        frame = {"type": "chat", "id": "r1", "request": {"messages": [{"role": "user", "content": prompt}], "max_tokens": 200}}
        if os.environ.get("WISP_KEY"):
            frame["api_key"] = os.environ["WISP_KEY"]
        await ws.send(json.dumps(frame))
        deltas = 0
        async for message in ws:
            event = json.loads(message)
            if event["type"] == "delta":
                print(event["content"], end="", flush=True)
                deltas += 1
                if deltas == 40:
                    await ws.send(json.dumps({"type": "cancel", "id": "r1"}))
            elif event["type"] in ("done", "error"):
                print("\n", event)
                return


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "Tell me a story."))
