"""An agent framework over the Responses API: the OpenAI Agents SDK (`openai-agents`),
unchanged, with a function tool.

Usage: python agents_sdk.py BASE_URL
Run by host/tests/e2e.rs against the instruct model. The SDK sends what agent clients send
(`include: []`, its tools, a `tool_choice`), runs the call the model makes, and ends the run
with the tool's output; streamed, it reads the call from the typed events.
"""

import asyncio
import sys

from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

base = sys.argv[1]
MODEL = "smollm2-135m-instruct"
set_tracing_disabled(True)
cities = []


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    cities.append(city)
    return f"18 C and sunny in {city}"


async def main():
    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    agent = Agent(
        name="weather",
        instructions="You answer questions about the weather with the get_weather tool.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(tool_choice="get_weather", max_tokens=60, temperature=0),
        tool_use_behavior="stop_on_first_tool",
    )

    result = await Runner.run(agent, "What is the weather in Paris?")
    assert len(cities) == 1 and isinstance(cities[0], str), cities
    assert result.final_output == f"18 C and sunny in {cities[0]}", result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"], kinds

    # Streamed: the SDK reads the call from the typed events.
    run = Runner.run_streamed(agent, "And the weather in Rome?")
    events = [event async for event in run.stream_events()]
    assert len(cities) == 2, cities
    assert run.final_output == f"18 C and sunny in {cities[1]}", run.final_output
    raw = [e.data.type for e in events if e.type == "raw_response_event"]
    assert "response.function_call_arguments.delta" in raw and "response.function_call_arguments.done" in raw, raw
    assert any(e.type == "run_item_stream_event" and e.name == "tool_called" for e in events), events


asyncio.run(main())
print("agents sdk: ok")
