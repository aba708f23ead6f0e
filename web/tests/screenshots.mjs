// Writes docs/web-chat-light.png and docs/web-chat-dark.png: the chat after a short real
// conversation, in each colour scheme. Run with `npm run screenshots` (needs the binary).
import { join } from "node:path";
import { launch, openChat, root, sendAndWait, setMaxTokens, startServer } from "./harness.mjs";

const server = await startServer();
const browser = await launch();
try {
  const { page } = await openChat(browser, server.url, { maxTokens: 60 });
  await sendAndWait(page, "Write a Python function that adds two numbers, in a markdown code block.");
  await setMaxTokens(page, 40);
  await sendAndWait(page, "Now list three colours as a markdown list.");
  for (const scheme of ["light", "dark"]) {
    await page.emulateMedia({ colorScheme: scheme });
    await page.screenshot({ path: join(root, `docs/web-chat-${scheme}.png`) });
  }
  console.log("docs/web-chat-{light,dark}.png written");
} finally {
  await browser.close();
  server.stop();
}
