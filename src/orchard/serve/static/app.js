// The chat page: talks to this server's OpenAI API (/v1/models, /v1/chat/completions, streamed).
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];      // the conversation, as the API takes it
let controller = null; // aborts the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function show(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : $("model").value;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("conversation").append(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { status("models: " + await errorText(response), true); return; }
  const select = $("model");
  const chosen = select.value;
  select.innerHTML = "";
  for (const model of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    select.append(option);
  }
  if (chosen) select.value = chosen;
  status("");
}

async function send(text) {
  history.push({ role: "user", content: text });
  show("user", text);
  const reply = show("assistant", "");
  const system = $("system").value.trim();
  const body = {
    model: $("model").value,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    stream: true,
  };
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  status("generating…");
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        for (const choice of chunk.choices) {
          if (choice.delta.content) reply.textContent += choice.delta.content;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        reply.parentElement.scrollIntoView({ block: "end" });
      }
    }
    status(finish === "length" ? "reply cut at max tokens" : "");
  } catch (error) {
    status(error.name === "AbortError" ? "stopped" : "error: " + error.message, error.name !== "AbortError");
  } finally {
    history.push({ role: "assistant", content: reply.textContent });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || controller) return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("conversation").innerHTML = "";
  status("");
});
$("api-key").addEventListener("change", loadModels);
loadModels();
