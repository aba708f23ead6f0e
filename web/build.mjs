// Builds the web chat into web/dist (embedded in the wisp binary at compile time):
// one bundled, minified app.js, the page and the styles. Nothing is fetched at runtime.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";

const dist = new URL("./dist/", import.meta.url);
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });

await build({
  entryPoints: [new URL("./src/app.js", import.meta.url).pathname],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  outfile: new URL("./app.js", dist).pathname,
  legalComments: "external",
});

// highlight.js themes, scoped to the colour scheme the system asks for.
const theme = (name) => readFileSync(new URL(`./node_modules/highlight.js/styles/${name}.min.css`, import.meta.url), "utf8");
const css = [
  readFileSync(new URL("./src/style.css", import.meta.url), "utf8"),
  `@media (prefers-color-scheme: light) { ${theme("github")} }`,
  `@media (prefers-color-scheme: dark) { ${theme("github-dark")} }`,
].join("\n");
writeFileSync(new URL("./style.css", dist), css);
copyFileSync(new URL("./src/index.html", import.meta.url), new URL("./index.html", dist));
copyFileSync(new URL("./src/favicon.svg", import.meta.url), new URL("./favicon.svg", dist));
console.log("web/dist built");
