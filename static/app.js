/*
 * omniphi chat page. Conversations live in localStorage; every answer is streamed from the server's
 * OpenAI-compatible /v1/chat/completions (the same API any client uses), and the microphone dictates into the
 * message box through /v1/audio/transcriptions, so the transcript can be checked before it is sent. Model output is rendered by a small
 * Markdown renderer that escapes everything first, so it can never inject HTML or script.
 */
"use strict";

const STORE_KEY = "omniphi.conversations.v1";
const CURRENT_KEY = "omniphi.current";
const API_KEY_KEY = "omniphi.apiKey";
const MAX_IMAGE_SIDE = 1024;       // attached images are scaled down to this before sending and storing
const MAX_RECORD_SECONDS = 120;

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"), scrim: $("scrim"), list: $("conversation-list"), newChat: $("new-chat"),
  toggleSidebar: $("toggle-sidebar"), modelName: $("model-name"), capabilities: $("capabilities"),
  title: $("chat-title"), messages: $("messages"), thread: $("thread"), empty: $("empty"),
  composer: $("composer"), input: $("input"), attachments: $("attachments"), send: $("send"), stop: $("stop"),
  attachImage: $("attach-image"), attachAudio: $("attach-audio"), record: $("record"), recordTimer: $("record-timer"),
  imageFile: $("image-file"), audioFile: $("audio-file"), notice: $("notice"), footnote: $("footnote"),
  dropOverlay: $("drop-overlay"),
};

const state = {
  conversations: loadConversations(),
  currentId: localStorage.getItem(CURRENT_KEY),
  pending: { images: [], audio: null },   // the composer's attachments
  capabilities: { images: false, speech: false, images_reason: "connecting…", speech_reason: "connecting…" },
  limits: { max_body_bytes: 25 * 2 ** 20, max_audio_seconds: MAX_RECORD_SECONDS, max_images: 16 },
  streaming: null,                        // {controller, conversation, message}
  recorder: null,
  dictating: false,                       // a recording is being transcribed into the composer
};

// ---------------------------------------------------------------------------
// safe Markdown: escape everything, then add a whitelisted subset of tags

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function renderInline(escaped) {
  // finished spans are held aside as \u0000N\u0000 (the source has no NULs) so that later patterns cannot reach into
  // them; URLs never take a NUL, and a hold inside a hold (a code span in a link label) is put back too
  const held = [];
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  let s = escaped.replace(/`([^`\n]+)`/g, (_, code) => hold(`<code>${code}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()\u0000]+)\)/g, (_, label, url) =>
    hold(`<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${emphasis(label)}</a>`));
  s = s.replace(/(^|[\s(])(https?:\/\/(?:(?!&quot;|&#39;|&lt;|&gt;)[^\s()\u0000])*[^\s().,;:!?&\u0000])/g,
    (_, lead, url) => lead + hold(`<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${url}</a>`));
  const restore = (text) => text.replace(/\u0000(\d+)\u0000/g, (_, i) => restore(held[Number(i)]));
  return restore(emphasis(s));
}

function emphasis(s) {
  return s
    .replace(/\*\*(?=\S)([^*\n]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([^_\n]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
}

function codeBlock(code, language) {
  const label = language ? escapeHtml(language) : "code";
  return `<div class="code-block"><div class="code-head"><span>${label}</span>` +
    `<button class="copy-code" type="button">Copy</button></div><pre><code>${escapeHtml(code)}</code></pre></div>`;
}

const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

function renderList(lines) {
  // lines: the raw lines of one list block; nesting follows indentation
  const root = { children: [], indent: -1 };
  const stack = [root];
  for (const line of lines) {
    const m = line.match(LIST_ITEM);
    if (!m) {  // a continuation line of the previous item
      const top = stack[stack.length - 1];
      const last = top.children[top.children.length - 1];
      if (last) last.text += "\n" + line.trim();
      continue;
    }
    const indent = m[1].replace(/\t/g, "    ").length;
    while (stack.length > 1 && indent <= stack[stack.length - 1].indent) stack.pop();
    let parent = stack[stack.length - 1];
    const lastItem = parent.children[parent.children.length - 1];
    if (lastItem && indent > (parent.itemIndent ?? indent)) {
      lastItem.sub = lastItem.sub || { children: [], indent, ordered: /\d/.test(m[2]) };
      stack.push(lastItem.sub);
      parent = lastItem.sub;
    }
    parent.itemIndent ??= indent;
    parent.ordered ??= /\d/.test(m[2]);
    parent.start ??= /\d/.test(m[2]) ? parseInt(m[2], 10) : 1;
    parent.children.push({ text: m[3] });
  }
  const emit = (list) => {
    const tag = list.ordered ? "ol" : "ul";
    const start = list.ordered && list.start !== 1 ? ` start="${list.start}"` : "";
    const items = list.children.map((item) =>
      `<li>${renderInline(escapeHtml(item.text)).replace(/\n/g, "<br>")}${item.sub ? emit(item.sub) : ""}</li>`);
    return `<${tag}${start}>${items.join("")}</${tag}>`;
  };
  return emit(root);
}

function renderMarkdown(source) {
  const lines = String(source).replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) out.push(`<p>${renderInline(escapeHtml(paragraph.join("\n"))).replace(/\n/g, "<br>")}</p>`);
    paragraph = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/);
    if (fence) {
      flush();
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      out.push(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    if (!line.trim()) { flush(); continue; }
    const heading = line.match(/^(#{1,6})\s+(.*?)\s*#*\s*$/);
    if (heading) {
      flush();
      const level = Math.min(heading[1].length + 2, 5);
      out.push(`<h${level}>${renderInline(escapeHtml(heading[2]))}</h${level}>`);
      continue;
    }
    if (LIST_ITEM.test(line) && !(paragraph.length && /^\s*\d/.test(line) && !/^\s*1[.)]/.test(line))) {
      flush();
      const block = [line];
      while (i + 1 < lines.length && lines[i + 1].trim() &&
             (LIST_ITEM.test(lines[i + 1]) || /^\s+\S/.test(lines[i + 1])) && !/^\s*(`{3,}|~{3,})/.test(lines[i + 1])) {
        block.push(lines[++i]);
      }
      out.push(renderList(block));
      continue;
    }
    paragraph.push(line);
  }
  flush();
  return out.join("");
}

// ---------------------------------------------------------------------------
// storage

function loadConversations() {
  try {
    const data = JSON.parse(localStorage.getItem(STORE_KEY) || "[]");
    const conversations = Array.isArray(data) ? data.filter((c) => c && c.id && Array.isArray(c.messages)) : [];
    for (const c of conversations) {  // an answer cut off by closing the page is kept as stopped
      for (const m of c.messages) if (m.status === "streaming") m.status = "stopped";
    }
    return conversations;
  } catch {
    return [];
  }
}

function saveConversations() {
  const write = () => localStorage.setItem(STORE_KEY, JSON.stringify(state.conversations));
  try {
    write();
  } catch {
    // storage is full: drop the media of the oldest conversations (the text stays) until it fits
    const byAge = [...state.conversations].sort((a, b) => a.updated - b.updated);
    for (const conversation of byAge) {
      for (const m of conversation.messages) {
        if (m.images && m.images.length) { m.mediaDropped = true; m.images = []; }
        if (m.audio && m.audio.url) { m.mediaDropped = true; m.audio.url = null; }
      }
      try { write(); notify("Browser storage is full: images and recordings of older chats were not kept."); return; } catch { /* next */ }
    }
    notify("Browser storage is full: this conversation could not be saved.");
  }
  if (state.currentId) localStorage.setItem(CURRENT_KEY, state.currentId);
}

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function newConversation() {
  const conversation = { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`, title: "New chat",
                         created: Date.now(), updated: Date.now(), messages: [] };
  state.conversations.push(conversation);
  state.currentId = conversation.id;
  return conversation;
}

// ---------------------------------------------------------------------------
// rendering

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function icon(name) {
  return $(`icon-${name}`).content.firstElementChild.cloneNode(true);
}

function renderSidebar() {
  ui.list.replaceChildren();
  const sorted = [...state.conversations].sort((a, b) => b.updated - a.updated);
  for (const conversation of sorted) {
    const row = el("div", "conversation" + (conversation.id === state.currentId ? " active" : ""));
    row.dataset.id = conversation.id;
    const open = el("button", "open", conversation.title || "New chat");
    open.type = "button";
    open.title = conversation.title || "New chat";
    open.addEventListener("click", () => switchTo(conversation.id));
    const remove = el("button", "icon-button delete");
    remove.type = "button";
    remove.title = "Delete conversation";
    remove.setAttribute("aria-label", `Delete ${conversation.title}`);
    remove.append(icon("trash"));
    remove.addEventListener("click", () => deleteConversation(conversation.id));
    row.append(open, remove);
    ui.list.append(row);
  }
}

function renderThread() {
  const conversation = current();
  ui.thread.replaceChildren();
  const messages = conversation ? conversation.messages : [];
  ui.empty.hidden = messages.length > 0;
  ui.title.textContent = conversation && conversation.messages.length ? conversation.title : "omniphi";
  for (const message of messages) ui.thread.append(renderMessage(message));
  scrollToBottom();
}

function renderMessage(message) {
  const node = el("div", `message ${message.role}`);
  node.dataset.id = message.id;
  if (message.role === "user") {
    if (message.images && message.images.length) {
      const images = el("div", "images");
      for (const image of message.images) {
        const img = el("img");
        img.src = image.url;
        img.alt = image.name || "attached image";
        images.append(img);
      }
      node.append(images);
    }
    if (message.audio) {
      const voice = el("div", "voice");
      if (message.audio.url) {
        const audio = el("audio");
        audio.controls = true;
        audio.src = message.audio.url;
        voice.append(audio);
      }
      const transcript = el("div", "transcript" + (message.audio.transcript ? "" : " pending"),
                            message.audio.transcript || (message.audio.failed ? "not transcribed" : "transcribing…"));
      voice.append(transcript);
      node.append(voice);
    }
    if (message.text) node.append(el("div", "bubble", message.text));
    if (message.mediaDropped) node.append(el("div", "transcript pending", "(media not kept: browser storage was full)"));
  } else {
    node.append(renderAssistantBody(message));
    if (message.status === "streaming") node.classList.add("streaming");
  }
  return node;
}

function renderAssistantBody(message) {
  const body = el("div", "body");
  if (message.status === "error") {
    body.append(el("div", "error", message.error));
    return body;
  }
  const content = el("div", "content");
  if (!message.text && message.status === "streaming") {
    content.append(el("span", "thinking"));
  } else {
    content.innerHTML = renderMarkdown(message.text);  // safe: renderMarkdown escapes all model text
  }
  body.append(content);
  if (message.status === "stopped") body.append(el("div", "status", "Stopped."));
  if (message.finish === "length") body.append(el("div", "status", "The answer reached the length limit."));
  return body;
}

function updateMessage(message) {
  const node = ui.thread.querySelector(`.message[data-id="${message.id}"]`);
  if (!node) return;
  const nearBottom = isNearBottom();
  node.replaceWith(renderMessage(message));
  if (nearBottom) scrollToBottom();
}

function isNearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

let frameQueued = null;
function scheduleUpdate(message) {
  if (frameQueued) return;
  frameQueued = requestAnimationFrame(() => { frameQueued = null; updateMessage(message); });
}

function renderCapabilities() {
  const caps = state.capabilities;
  ui.capabilities.replaceChildren(
    el("div", caps.images ? "" : "off", `Images: ${caps.images ? "yes" : "no"}`),
    el("div", caps.speech ? "" : "off", `Speech: ${caps.speech ? "yes" : "no"}`));
  const recordable = caps.speech && window.MediaRecorder && navigator.mediaDevices && navigator.mediaDevices.getUserMedia;
  ui.attachImage.disabled = !caps.images;
  ui.attachImage.title = caps.images ? "Attach images" : `Images are unavailable: ${caps.images_reason}`;
  ui.attachAudio.disabled = !caps.speech;
  ui.attachAudio.title = caps.speech ? "Upload an audio file" : `Speech is unavailable: ${caps.speech_reason}`;
  ui.record.disabled = !recordable;
  ui.record.title = !caps.speech ? `Speech is unavailable: ${caps.speech_reason}`
    : recordable ? "Dictate with the microphone (the text appears here before it is sent)" : "This browser cannot record audio here (needs MediaRecorder and a secure origin)";
  ui.footnote.querySelectorAll(".off").forEach((n) => n.remove());
  if (!caps.speech) ui.footnote.append(el("span", "off", `Speech input is off: ${caps.speech_reason}`));
}

function notify(message) {
  ui.notice.textContent = message;
  ui.notice.hidden = false;
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => { ui.notice.hidden = true; }, 8000);
}

function updateComposer() {
  const hasContent = ui.input.value.trim() || state.pending.images.length || state.pending.audio;
  ui.send.disabled = !hasContent || Boolean(state.streaming) || Boolean(state.recorder) || state.dictating;
  ui.send.hidden = Boolean(state.streaming);
  ui.stop.hidden = !state.streaming;
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 192)}px`;
}

function renderAttachments() {
  const { images, audio } = state.pending;
  ui.attachments.replaceChildren();
  ui.attachments.hidden = !images.length && !audio;
  images.forEach((image, index) => {
    const thumb = el("div", "thumb");
    const img = el("img");
    img.src = image.url;
    img.alt = image.name;
    thumb.append(img, removeButton(`Remove ${image.name}`, () => { images.splice(index, 1); renderAttachments(); }));
    ui.attachments.append(thumb);
  });
  if (audio) {
    const chip = el("div", "audio-chip");
    const player = el("audio");
    player.controls = true;
    player.src = audio.url;
    chip.append(player, el("span", "name", audio.name),
                removeButton(`Remove ${audio.name}`, () => { state.pending.audio = null; renderAttachments(); }));
    ui.attachments.append(chip);
  }
  updateComposer();
}

function removeButton(label, onClick) {
  const button = el("button", "remove");
  button.type = "button";
  button.title = label;
  button.setAttribute("aria-label", label);
  button.append(icon("x"));
  button.addEventListener("click", onClick);
  return button;
}

// ---------------------------------------------------------------------------
// conversations

function switchTo(id) {
  state.currentId = id;
  localStorage.setItem(CURRENT_KEY, id);
  document.body.classList.remove("sidebar-open");
  ui.scrim.hidden = true;
  renderSidebar();
  renderThread();
  ui.input.focus();
}

function startNewChat() {
  const conversation = current();
  if (conversation && !conversation.messages.length) { switchTo(conversation.id); return; }
  state.currentId = null;
  localStorage.removeItem(CURRENT_KEY);
  renderSidebar();
  renderThread();
  ui.input.focus();
}

function deleteConversation(id) {
  if (state.streaming && state.streaming.conversation.id === id) state.streaming.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) {
    state.currentId = null;
    localStorage.removeItem(CURRENT_KEY);
  }
  saveConversations();
  renderSidebar();
  renderThread();
}

// ---------------------------------------------------------------------------
// talking to the server

function authHeader() {
  const key = localStorage.getItem(API_KEY_KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function authorizedFetch(url, options, retried = false) {
  // a 401 asks for the server's key once, then tries again with it
  const response = await fetch(url, { ...options, headers: { ...options.headers, ...authHeader() } });
  if (response.status !== 401 || retried) return response;
  const key = window.prompt("This server needs an API key (start serve.py with --api_key to set one):");
  if (!key) return response;
  localStorage.setItem(API_KEY_KEY, key.trim());
  loadCapabilities();
  return authorizedFetch(url, options, true);
}

async function loadCapabilities() {
  try {
    const response = await fetch("/health", { headers: authHeader() });
    const health = await response.json();
    if (!health.capabilities) {  // a server with an API key tells only that it is alive until it gets the key
      const reason = "this server needs an API key: send a message to enter it";
      state.capabilities = { images: false, speech: false, images_reason: reason, speech_reason: reason };
      ui.modelName.textContent = "API key needed";
      renderCapabilities();
      return;
    }
    state.capabilities = health.capabilities;
    state.limits = { ...state.limits, ...health.limits };
    ui.modelName.textContent = health.model;
    ui.modelName.title = `context: ${health.limits.context} tokens`;
  } catch {
    ui.modelName.textContent = "server unreachable";
    state.capabilities = { images: false, speech: false, images_reason: "the server cannot be reached",
                           speech_reason: "the server cannot be reached" };
  }
  renderCapabilities();
}

function dataPayload(url) {
  return url.slice(url.indexOf(",") + 1);
}

function requestMessages(conversation, upTo) {
  // earlier turns that got an answer, then the new user message; audio of earlier turns is sent as its transcript
  const sent = [];
  const messages = conversation.messages.slice(0, upTo + 1);
  for (let i = 0; i < messages.length; i++) {
    const m = messages[i];
    if (m.role !== "user") continue;
    const answer = messages[i + 1];
    const isNew = i === upTo;
    if (!isNew && !(answer && answer.role === "assistant" && answer.text && answer.status !== "error")) continue;
    const parts = [];
    for (const image of m.images || []) parts.push({ type: "image_url", image_url: { url: image.url } });
    if (m.text) parts.push({ type: "text", text: m.text });
    if (m.audio) {
      parts.push(isNew || !m.audio.transcript
        ? { type: "input_audio", input_audio: { data: dataPayload(m.audio.url), format: m.audio.format } }
        : { type: "input_audio", input_audio: { transcript: m.audio.transcript, format: m.audio.format } });
    }
    sent.push({ role: "user", content: parts, source: m });
    if (!isNew) sent.push({ role: "assistant", content: answer.text });
  }
  return sent;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function send() {
  if (state.streaming || state.recorder || state.dictating) return;
  const text = ui.input.value.trim();
  const { images, audio } = state.pending;
  if (!text && !images.length && !audio) return;
  const conversation = current() || newConversation();
  const userMessage = { id: messageId(), role: "user", text, images: [...images], audio: audio ? { ...audio, transcript: null } : null };
  const answer = { id: messageId(), role: "assistant", text: "", status: "streaming" };
  conversation.messages.push(userMessage, answer);
  if (conversation.title === "New chat") conversation.title = titleFrom(userMessage);
  conversation.updated = Date.now();
  ui.input.value = "";
  state.pending = { images: [], audio: null };
  renderAttachments();
  saveConversations();
  renderSidebar();
  renderThread();
  await stream(conversation, conversation.messages.length - 2, answer);
}

function titleFrom(message) {
  const text = message.text || (message.audio && message.audio.transcript) || "";
  if (text) return text.length > 48 ? `${text.slice(0, 47)}…` : text;
  return message.audio ? "Voice message" : "Image";
}

function messageId() {
  return `m${Date.now().toString(36)}${Math.random().toString(36).slice(2, 7)}`;
}

async function stream(conversation, userIndex, answer) {
  const controller = new AbortController();
  state.streaming = { controller, conversation, message: answer };
  updateComposer();
  const userMessage = conversation.messages[userIndex];
  const wire = requestMessages(conversation, userIndex);
  const newIndex = wire.findIndex((m) => m.source === userMessage);
  const body = { model: "omniphi", stream: true, messages: wire.map(({ role, content }) => ({ role, content })) };
  const show = () => { if (state.currentId === conversation.id) scheduleUpdate(answer); };
  try {
    const response = await authorizedFetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal });
    if (!response.ok) throw new RefusedError(await errorMessage(response), response.status);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new RefusedError(chunk.error.message, 500);
          if (chunk.transcripts && userMessage.audio) {
            const heard = chunk.transcripts.find((t) => t.message === newIndex);
            if (heard) {
              userMessage.audio.transcript = heard.text;
              if (conversation.title === "Voice message") { conversation.title = titleFrom(userMessage); renderSidebar(); }
              if (state.currentId === conversation.id) updateMessage(userMessage);
            }
          }
          const choice = chunk.choices && chunk.choices[0];
          if (choice && choice.delta && choice.delta.content) {
            answer.text += choice.delta.content;
            show();
          }
          if (choice && choice.finish_reason) answer.finish = choice.finish_reason;
        }
      }
    }
    answer.status = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      answer.status = "stopped";
    } else {
      answer.status = "error";
      answer.error = err instanceof RefusedError
        ? `The server refused the request: ${err.message}`
        : `Could not reach the server (${err.message}).`;
      if (userMessage.audio && !userMessage.audio.transcript) userMessage.audio.failed = true;
    }
  } finally {
    state.streaming = null;
    conversation.updated = Date.now();
    saveConversations();
    if (state.currentId === conversation.id) {
      cancelAnimationFrame(frameQueued);
      frameQueued = null;
      updateMessage(userMessage);
      updateMessage(answer);
    }
    updateComposer();
  }
}

class RefusedError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// ---------------------------------------------------------------------------
// attachments: images, audio files, the microphone

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function addImage(file) {
  if (!state.capabilities.images) { notify(`This model cannot see images: ${state.capabilities.images_reason}`); return; }
  if (state.pending.images.length >= state.limits.max_images) { notify(`At most ${state.limits.max_images} images per message.`); return; }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    notify(`${file.name || "The pasted file"} is not an image this browser can read.`);
    return;
  }
  let url;
  const scale = Math.min(1, MAX_IMAGE_SIDE / Math.max(bitmap.width, bitmap.height));
  if (scale < 1 || file.size > 1.5 * 2 ** 20 || !/^image\/(png|jpeg|webp|gif)$/.test(file.type)) {
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const context = canvas.getContext("2d");
    context.fillStyle = "#ffffff";  // transparency becomes white, as CLIP preprocessing does
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    url = canvas.toDataURL("image/jpeg", 0.9);
  } else {
    url = await readAsDataURL(file);
  }
  bitmap.close();
  state.pending.images.push({ url, name: file.name || "pasted image" });
  renderAttachments();
}

const AUDIO_FORMATS = { "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3", "audio/mp3": "mp3",
  "audio/webm": "webm", "video/webm": "webm", "audio/ogg": "ogg", "audio/opus": "opus", "audio/flac": "flac",
  "audio/x-flac": "flac", "audio/mp4": "m4a", "audio/x-m4a": "m4a", "audio/aac": "aac" };

function audioFormat(blob, name) {
  const mime = (blob.type || "").split(";")[0].toLowerCase();
  if (AUDIO_FORMATS[mime]) return AUDIO_FORMATS[mime];
  const extension = (name || "").split(".").pop().toLowerCase();
  return Object.values(AUDIO_FORMATS).includes(extension) ? extension : null;
}

async function addAudio(blob, name) {
  if (!state.capabilities.speech) { notify(`Speech input is off: ${state.capabilities.speech_reason}`); return; }
  const format = audioFormat(blob, name);
  if (!format) { notify(`${name} is not an audio format the server reads (wav, mp3, webm, ogg, flac, m4a).`); return; }
  if (blob.size > state.limits.max_body_bytes * 0.7) { notify(`${name} is too large to send.`); return; }
  if (!blob.size) { notify(`${name} is empty.`); return; }
  state.pending.audio = { url: await readAsDataURL(blob), format, name };
  renderAttachments();
}

function addFiles(files) {
  for (const file of files) {
    if (file.type.startsWith("image/")) addImage(file);
    else if (file.type.startsWith("audio/") || audioFormat(file, file.name)) addAudio(file, file.name);
    else notify(`${file.name}: only images and audio files can be attached.`);
  }
}

async function dictate(blob) {
  // a live recording becomes text in the composer, to be read (and edited) before it is sent
  if (!blob.size) { notify("Nothing was recorded."); return; }
  state.dictating = true;
  ui.record.classList.add("transcribing");
  ui.input.placeholder = "Transcribing…";
  updateComposer();
  try {
    const form = new FormData();
    form.append("file", blob, `recording.${audioFormat(blob, "") || "webm"}`);
    form.append("model", "whisper-1");
    const response = await authorizedFetch("/v1/audio/transcriptions", { method: "POST", body: form });
    if (!response.ok) throw new Error(await errorMessage(response));
    const { text } = await response.json();
    const typed = ui.input.value.trimEnd();
    ui.input.value = typed ? `${typed} ${text}` : text;
  } catch (err) {
    notify(`The recording could not be transcribed: ${err.message}`);
  } finally {
    state.dictating = false;
    ui.record.classList.remove("transcribing");
    ui.input.placeholder = "Message omniphi";
    updateComposer();
    ui.input.focus();
    ui.input.setSelectionRange(ui.input.value.length, ui.input.value.length);
  }
}

async function toggleRecording() {
  if (state.recorder) { state.recorder.stop(); return; }
  if (state.dictating) return;
  let media;
  try {
    media = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    notify(`The microphone is not available: ${err.message || err.name}`);
    return;
  }
  const type = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/mp4"]
    .find((t) => MediaRecorder.isTypeSupported(t));
  const recorder = new MediaRecorder(media, type ? { mimeType: type } : undefined);
  const chunks = [];
  const started = Date.now();
  const limit = Math.min(MAX_RECORD_SECONDS, state.limits.max_audio_seconds);
  const tick = () => {
    const seconds = Math.floor((Date.now() - started) / 1000);
    ui.recordTimer.textContent = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
    if (seconds >= limit && recorder.state === "recording") recorder.stop();
  };
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = () => {
    clearInterval(recorder.timer);
    media.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    ui.record.classList.remove("recording");
    ui.record.title = "Dictate with the microphone (the text appears here before it is sent)";
    ui.recordTimer.hidden = true;
    dictate(new Blob(chunks, { type: (recorder.mimeType || "audio/webm").split(";")[0] }));
  };
  recorder.start(250);
  recorder.timer = setInterval(tick, 250);
  state.recorder = recorder;
  tick();
  ui.record.classList.add("recording");
  ui.record.title = "Stop recording";
  ui.recordTimer.hidden = false;
  updateComposer();
}

// ---------------------------------------------------------------------------
// events

ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
ui.input.addEventListener("input", updateComposer);
ui.stop.addEventListener("click", () => { if (state.streaming) state.streaming.controller.abort(); });
ui.newChat.addEventListener("click", startNewChat);
ui.toggleSidebar.addEventListener("click", () => {
  document.body.classList.toggle("sidebar-open");
  ui.scrim.hidden = !document.body.classList.contains("sidebar-open");
});
ui.scrim.addEventListener("click", () => { document.body.classList.remove("sidebar-open"); ui.scrim.hidden = true; });
ui.attachImage.addEventListener("click", () => ui.imageFile.click());
ui.attachAudio.addEventListener("click", () => ui.audioFile.click());
ui.imageFile.addEventListener("change", () => { addFiles(ui.imageFile.files); ui.imageFile.value = ""; });
ui.audioFile.addEventListener("change", () => { addFiles(ui.audioFile.files); ui.audioFile.value = ""; });
ui.record.addEventListener("click", toggleRecording);

ui.thread.addEventListener("click", async (e) => {
  const button = e.target.closest(".copy-code");
  if (!button) return;
  const code = button.closest(".code-block").querySelector("pre code").textContent;
  try {
    await navigator.clipboard.writeText(code);
  } catch {
    const area = el("textarea");
    area.value = code;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
});

document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length) { e.preventDefault(); addFiles(files); }
});

let dragDepth = 0;  // dragenter/dragleave fire for every element crossed; count them to know when the drag left
document.addEventListener("dragenter", (e) => {
  if (!e.dataTransfer || ![...e.dataTransfer.types].includes("Files")) return;
  dragDepth++;
  ui.dropOverlay.hidden = false;
});
document.addEventListener("dragleave", () => {
  if (dragDepth > 0 && --dragDepth === 0) ui.dropOverlay.hidden = true;
});
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  ui.dropOverlay.hidden = true;
  if (e.dataTransfer && e.dataTransfer.files.length) addFiles(e.dataTransfer.files);
});

window.omniphi = { renderMarkdown, state };  // for tests and the curious

if (!current()) state.currentId = null;
renderSidebar();
renderThread();
renderAttachments();
renderCapabilities();
loadCapabilities();
ui.input.focus();
