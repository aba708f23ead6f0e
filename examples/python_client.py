"""wisp with the official OpenAI Python SDK (pip install openai), against `make run`.

    python examples/python_client.py            # WISP_URL / WISP_KEY override the defaults
"""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("WISP_URL", "http://127.0.0.1:8080") + "/v1", api_key=os.environ.get("WISP_KEY", "none"))

print([m.id for m in client.models.list().data])

reply = client.chat.completions.create(
    model="gemma-3-270m",
    messages=[{"role": "user", "content": "Name three colours."}],
    max_tokens=24,
)
print(reply.choices[0].message.content, reply.usage)

stream = client.chat.completions.create(
    model="gemma-3-270m",
    messages=[{"role": "user", "content": "Count to five."}],
    max_tokens=24,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

# A server-side session: wisp keeps the history, the request carries only the new message.
session = client.post("/sessions", body={"system_prompt": "Be brief."}, cast_to=object)
reply = client.chat.completions.create(
    model="gemma-3-270m",
    messages=[{"role": "user", "content": "What is a wisp?"}],
    max_tokens=24,
    extra_body={"session_id": session["id"]},
)
print(reply.choices[0].message.content)
