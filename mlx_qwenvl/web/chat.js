// The chat page of `mlx-qwenvl server`. It talks to the server's own /v1/chat/completions
// (streamed, with usage) and resends the whole conversation, images included, on every turn:
// the server continues the conversation it has cached, so later turns are fast.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const config = document.body.dataset; // filled in by the server as it serves the page
  const MODEL = config.model;
  const FACTOR = Number(config.factor) || 28;
  const MAX_PIXELS = Number(config.maxPixels) || Infinity;
  const MIN_PIXELS = Number(config.minPixels) || 0;
  const MAX_RATIO = 200; // the server refuses more elongated images itself
  const KEY_ITEM = "mlx-qwenvl.api-key";
  // The server sends a keep-alive line every few seconds, even while a request waits or its
  // prompt is read: this long without a byte means the connection is broken.
  const SILENCE_MS = 45000;

  const log = $("log");
  const scroller = document.querySelector("main");
  const message = $("message");
  const fileInput = $("file");
  const sendButton = $("send");
  const stopButton = $("stop");
  const statusLine = $("status");
  const attachmentList = $("attachments");

  let history = []; // the conversation as OpenAI messages, resent whole on every turn
  let pending = []; // attached images not sent yet: {name, thumb, ready, li}
  let running = null; // the request in flight: {controller, reason}
  let conversation = 0; // bumped by New chat, so a late answer never lands in the new one

  const number = (n) => Number(n).toLocaleString("en-US");
  const oneLine = (text) => String(text).replace(/\s+/g, " ").trim();

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  class PageError extends Error {}

  // ---- images

  function roundHalfEven(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  // The size the server resizes an image to (mlx_qwenvl.image_processing.smart_resize): sides
  // multiples of FACTOR, the area within the budget. Resizing to it here changes nothing on the
  // server's side, and sends fewer bytes.
  function serverSize(height, width) {
    let h = roundHalfEven(height / FACTOR) * FACTOR;
    let w = roundHalfEven(width / FACTOR) * FACTOR;
    if (h * w > MAX_PIXELS) {
      const beta = Math.sqrt((height * width) / MAX_PIXELS);
      h = Math.max(FACTOR, Math.floor(height / beta / FACTOR) * FACTOR);
      w = Math.max(FACTOR, Math.floor(width / beta / FACTOR) * FACTOR);
    } else if (h * w < MIN_PIXELS) {
      const beta = Math.sqrt(MIN_PIXELS / (height * width));
      h = Math.ceil((height * beta) / FACTOR) * FACTOR;
      w = Math.ceil((width * beta) / FACTOR) * FACTOR;
    }
    return [h, w];
  }

  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new PageError(`cannot read ${file.name}: ${reader.error}`));
      reader.readAsDataURL(file);
    });
  }

  async function decode(url) {
    const image = new Image();
    image.src = url;
    await image.decode();
    return image;
  }

  // The data URI to send, and what to say under the thumbnail. A file the browser cannot
  // show is sent as it is: the server reads formats browsers do not, and says when it cannot.
  async function prepare(file, thumb) {
    const item = { name: file.name || "pasted image", thumb, previewable: true, note: "", short: "" };
    let image = null;
    try {
      image = await decode(thumb);
    } catch {
      item.previewable = false;
      item.note = "no preview: the browser cannot show this file; the server will say if it can read it";
    }
    if (image) {
      const width = image.naturalWidth;
      const height = image.naturalHeight;
      const ratio = Math.max(width, height) / Math.max(1, Math.min(width, height));
      if (width * height > MAX_PIXELS && ratio <= MAX_RATIO) {
        const [h, w] = serverSize(height, width);
        const canvas = el("canvas");
        canvas.width = w;
        canvas.height = h;
        const context = canvas.getContext("2d");
        context.imageSmoothingQuality = "high";
        context.drawImage(image, 0, 0, w, h);
        const type = file.type === "image/jpeg" ? "image/jpeg" : "image/png";
        item.url = canvas.toDataURL(type, 0.92);
        item.note = `resized here from ${width}×${height} to ${w}×${h}: over the server's budget of ${number(MAX_PIXELS)} pixels`;
        item.short = `resized to ${w}×${h}`;
      }
    }
    if (!item.url) item.url = await readDataUrl(file);
    return item;
  }

  function addFiles(files) {
    for (const file of files) {
      const thumb = URL.createObjectURL(file);
      const entry = { name: file.name || "pasted image", thumb, li: el("li") };
      entry.ready = prepare(file, thumb);
      pending.push(entry);
      showAttachment(entry);
    }
    updateStatus();
  }

  function showAttachment(entry) {
    const { li } = entry;
    const preview = el("div", "placeholder", "reading…");
    const note = el("div", "note");
    const remove = el("button", "remove", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove ${entry.name}`);
    remove.title = `Remove ${entry.name}`;
    remove.addEventListener("click", () => {
      pending = pending.filter((p) => p !== entry);
      URL.revokeObjectURL(entry.thumb);
      li.remove();
      message.focus();
    });
    li.append(preview, el("div", "name", entry.name), note, remove);
    attachmentList.append(li);
    entry.ready.then(
      (item) => {
        if (item.previewable) {
          const img = el("img");
          img.src = item.thumb;
          img.alt = item.name;
          preview.replaceWith(img);
        } else {
          preview.textContent = "no preview";
        }
        note.textContent = item.note;
        updateStatus();
      },
      (error) => {
        preview.textContent = "unreadable";
        note.textContent = oneLine(error.message);
      },
    );
  }

  function updateStatus(text) {
    if (text !== undefined) statusLine.textContent = text;
    else if (!running) statusLine.textContent = pending.length ? `${pending.length} image${pending.length > 1 ? "s" : ""} attached` : "";
  }

  // ---- the conversation on screen

  function nearBottom() {
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  }

  // Adds to the log, following it down when it was showing its end.
  function append(node, parent = log) {
    const follow = nearBottom();
    parent.append(node);
    if (follow) scroller.scrollTop = scroller.scrollHeight;
    return node;
  }

  function showQuestion(text, items) {
    const box = el("div", "msg user");
    box.append(el("div", "who", "You"));
    if (items.length) {
      const images = el("div", "images");
      for (const item of items) {
        const figure = el("figure");
        if (item.previewable) {
          const img = el("img");
          img.src = item.thumb;
          img.alt = item.name;
          figure.append(img);
        }
        figure.append(el("figcaption", "", item.short ? `${item.name}, ${item.short}` : item.name));
        images.append(figure);
      }
      box.append(images);
    }
    if (text) box.append(el("div", "text", text));
    return append(box);
  }

  function showAnswer() {
    const box = el("div", "msg assistant");
    box.append(el("div", "who", MODEL), el("div", "text"));
    return append(box);
  }

  function showError(text) {
    return append(el("div", "msg error", oneLine(text)));
  }

  // ---- talking to the server

  async function errorText(response) {
    const raw = await response.text().catch(() => "");
    let detail = raw;
    try {
      const body = JSON.parse(raw);
      detail = (body.error && (body.error.message || body.error)) || body.message || raw;
    } catch {
      detail = /^\s*</.test(raw) ? `${response.statusText} ${raw.replace(/<[^>]*>/g, " ")}` : raw; // not JSON
    }
    detail = oneLine(detail || response.statusText).slice(0, 400);
    return describeError(response.status, detail, response.headers.get("Retry-After"));
  }

  function describeError(status, detail, retryAfter) {
    if (status === 503 || status === 429) {
      const wait = retryAfter ? ` (try again in ${retryAfter} s)` : /retry|again/i.test(detail) ? "" : " (try again in a moment)";
      return `Server busy (${status}): ${detail}${wait}`;
    }
    const hint = /context/i.test(detail) ? " — start a New chat to free the context" : "";
    return `Error${status ? ` ${status}` : ""}: ${detail}${hint}`;
  }

  function askForKey(reason) {
    const dialog = $("key-dialog");
    const input = $("api-key");
    $("key-why").textContent = reason;
    input.value = "";
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        const key = input.value.trim();
        input.value = "";
        resolve(dialog.returnValue === "ok" && key ? key : null);
      }, { once: true });
      dialog.showModal();
      input.focus();
    });
  }

  function closeKeyDialog() {
    const dialog = $("key-dialog");
    if (dialog.open) dialog.close("cancel");
  }

  function requestBody() {
    const body = { model: MODEL, messages: history, stream: true, stream_options: { include_usage: true } };
    const maxTokens = $("max-tokens").value;
    const temperature = $("temperature").value;
    const seed = $("seed").value;
    if (maxTokens !== "") body.max_tokens = Math.max(1, Math.round(Number(maxTokens)));
    if (temperature !== "") body.temperature = Math.max(0, Number(temperature));
    if (seed !== "") body.seed = Math.max(0, Math.round(Number(seed)));
    return JSON.stringify(body);
  }

  // One answer, streamed into `box`. Resolves with {text, usage, finish, times}; rejects with a
  // PageError whose message is the line to show, or an AbortError when stopped.
  async function fetchAnswer(box, job) {
    let askedForKey = false;
    for (;;) {
      const key = sessionStorage.getItem(KEY_ITEM);
      const headers = { "Content-Type": "application/json" };
      if (key) headers.Authorization = `Bearer ${key}`;
      job.controller = new AbortController();
      const started = performance.now();
      let timer = 0;
      const arm = () => {
        clearTimeout(timer);
        timer = setTimeout(() => {
          job.reason = "silent";
          job.controller.abort();
        }, SILENCE_MS);
      };
      arm();
      try {
        let response;
        try {
          response = await fetch("v1/chat/completions", {
            method: "POST", headers, body: requestBody(), signal: job.controller.signal, cache: "no-store",
          });
        } catch (error) {
          if (error.name === "AbortError") throw error;
          throw new PageError(`Cannot reach the server at ${location.origin}: ${error.message}`);
        }
        if (response.status === 401 && !askedForKey) {
          const why = await errorText(response);
          sessionStorage.removeItem(KEY_ITEM);
          clearTimeout(timer);
          const entered = await askForKey(key
            ? `The server did not take the key you gave (${why}). Enter it again:`
            : "This server needs an API key (the one it was started with, --api-key). It is kept in this tab only, until you close it.");
          if (job.reason) throw new DOMException("stopped", "AbortError");
          if (!entered) throw new PageError(`${why} (no API key given)`);
          sessionStorage.setItem(KEY_ITEM, entered);
          askedForKey = true;
          continue;
        }
        if (!response.ok) throw new PageError(await errorText(response));
        return await readStream(response, box, arm, started);
      } finally {
        clearTimeout(timer);
      }
    }
  }

  async function readStream(response, box, arm, started) {
    const textNode = box.querySelector(".text");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const answer = { text: "", usage: null, finish: null, started, first: 0, end: 0 };
    let buffer = "";
    let done = false;

    const handle = (block) => {
      const lines = block.split(/\r?\n/);
      const progress = lines.find((line) => line.startsWith(": prefill "));
      if (progress) updateStatus(`Reading the prompt: ${progress.slice(10)} tokens`);
      const data = lines.filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
      if (!data) return; // a comment: keep-alive or prompt progress
      if (data === "[DONE]") {
        done = true;
        return;
      }
      let event;
      try {
        event = JSON.parse(data);
      } catch {
        throw new PageError(`The server sent something unreadable: ${oneLine(data).slice(0, 120)}`);
      }
      if (event.error) {
        const error = event.error;
        throw new PageError(describeError(error.status || 0, oneLine(error.message || JSON.stringify(error))));
      }
      for (const choice of event.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (!answer.first) {
            answer.first = performance.now();
            updateStatus("Answering…");
          }
          answer.text += piece;
          const follow = nearBottom();
          textNode.textContent = answer.text;
          if (follow) scroller.scrollTop = scroller.scrollHeight;
        }
        if (choice.finish_reason) answer.finish = choice.finish_reason;
      }
      if (event.usage) answer.usage = event.usage;
    };

    for (;;) {
      const { value, done: closed } = await reader.read();
      if (closed) break;
      arm();
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        handle(block);
      }
    }
    if (buffer.trim()) handle(buffer);
    answer.end = performance.now();
    if (!done) throw new PageError("The connection closed before the answer was complete (the server stopped or the network failed).");
    return answer;
  }

  function usageLine(answer) {
    const usage = answer.usage;
    const parts = [];
    if (usage) {
      const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
      const promptSeconds = ((answer.first || answer.end) - answer.started) / 1000;
      parts.push(`prompt ${number(usage.prompt_tokens)} tokens (${number(cached)} cached) in ${promptSeconds.toFixed(2)} s`);
      const decodeSeconds = (answer.end - answer.first) / 1000;
      const rate = answer.first && usage.completion_tokens > 1 && decodeSeconds > 0
        ? `${((usage.completion_tokens - 1) / decodeSeconds).toFixed(1)} tokens/s`
        : `${(usage.completion_tokens / Math.max(1e-3, (answer.end - answer.started) / 1000)).toFixed(1)} tokens/s`;
      parts.push(`answer ${number(usage.completion_tokens)} tokens, ${rate}`);
    }
    if (answer.finish === "length") parts.push("cut at the token limit");
    return parts.join(" · ");
  }

  function setBusy(busy) {
    sendButton.disabled = busy;
    stopButton.disabled = !busy;
    log.setAttribute("aria-busy", String(busy));
  }

  async function send() {
    if (running) return;
    const text = message.value.trim();
    if (!text && !pending.length) {
      updateStatus("Type a question (or attach an image) first.");
      message.focus();
      return;
    }
    const job = { controller: null, reason: null };
    const mine = conversation;
    running = job;
    setBusy(true);
    updateStatus(pending.length ? "Reading images…" : "Sending…");
    const box = { question: null, answer: null };
    let turn = 0;
    try {
      const entries = pending;
      let items;
      try {
        items = await Promise.all(entries.map((entry) => entry.ready));
      } catch (error) {
        throw new PageError(error.message);
      }
      if (job.reason || mine !== conversation) return;
      pending = [];
      attachmentList.replaceChildren();
      message.value = "";
      const content = items.map((item) => ({ type: "image_url", image_url: { url: item.url } }));
      if (text) content.push({ type: "text", text });
      history.push({ role: "user", content: items.length ? content : text });
      turn = history.length;
      box.question = showQuestion(text, items);
      box.answer = showAnswer();
      updateStatus("Waiting for the answer…");
      const answer = await fetchAnswer(box.answer, job);
      if (mine !== conversation) return;
      history.push({ role: "assistant", content: answer.text });
      append(el("div", "usage", usageLine(answer)), box.answer);
    } catch (error) {
      if (mine !== conversation || job.reason === "new") return; // New chat: nothing to report
      const partial = box.answer ? box.answer.querySelector(".text").textContent : "";
      if (error.name === "AbortError" && job.reason === "stop") {
        if (partial) {
          history.push({ role: "assistant", content: partial });
          append(el("div", "usage", "stopped"), box.answer);
        } else {
          dropTurn(turn, box, "stopped before the answer began; not kept in the conversation");
        }
        return;
      }
      const line = error.name === "AbortError" && job.reason === "silent"
        ? `No data from the server for ${SILENCE_MS / 1000} s: the connection seems broken.`
        : error instanceof PageError ? error.message : `Error: ${error.message || error}`;
      dropTurn(turn, box, "not kept in the conversation");
      showError(line);
    } finally {
      if (running === job) {
        running = null;
        setBusy(false);
        updateStatus();
        if (!document.querySelector("dialog[open]")) message.focus();
      }
    }
  }

  // A question that got no answer leaves the conversation (so the next one is not resent with
  // it), and says so.
  function dropTurn(turn, box, why) {
    if (turn) history.length = turn - 1;
    if (box.answer && !box.answer.querySelector(".text").textContent) box.answer.remove();
    if (box.question) {
      box.question.classList.add("failed");
      append(el("div", "note", why), box.question);
    }
  }

  function stop() {
    if (!running) return;
    running.reason = "stop";
    if (running.controller) running.controller.abort();
    closeKeyDialog();
  }

  function newChat() {
    if (running) {
      running.reason = "new";
      if (running.controller) running.controller.abort();
      closeKeyDialog();
      running = null;
      setBusy(false);
    }
    conversation += 1;
    history = [];
    for (const entry of pending) URL.revokeObjectURL(entry.thumb);
    for (const img of log.querySelectorAll("img")) URL.revokeObjectURL(img.src);
    pending = [];
    attachmentList.replaceChildren();
    log.replaceChildren();
    message.value = "";
    updateStatus("");
    message.focus();
  }

  // ---- wiring

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (running) updateStatus("Still answering: wait, or Stop it.");
      else send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && running && !document.querySelector("dialog[open]")) stop();
  });
  stopButton.addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = "";
  });

  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    document.body.classList.remove("dragging");
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    event.preventDefault();
    addFiles(event.dataTransfer.files);
    message.focus();
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? Array.from(event.clipboardData.files) : [];
    if (!files.length) return; // text: pasted into the message as usual
    event.preventDefault();
    addFiles(files);
  });

  if (Number.isFinite(MAX_PIXELS)) $("budget").textContent = number(MAX_PIXELS);
  message.focus();
})();
