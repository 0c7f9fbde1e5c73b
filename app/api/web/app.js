// The lora-rag web page: plain JavaScript, no framework, no build step, nothing loaded from elsewhere.
// Every text that comes from the server (answers, passages, file names, error messages) is put into the page
// with textContent, never as HTML: a document can hold markup, and it must show as text.
"use strict";

(function () {
  const KEY_STORAGE = "lora-rag.apiKey";
  const LANG_STORAGE = "lora-rag.lang";
  const HEALTH_EVERY_MS = 20000;
  const INFO_FOR_MS = 10000;
  const STREAM_ERROR = -1; // ApiError status of an `error` event inside a stream that began with 200
  const BASE = "__base__";
  const MIX = "__mix__";

  const TEXT = {
    en: {
      "lang.label": "Language",
      "health.unknown": "checking…",
      "health.healthy": "healthy",
      "health.degraded": "degraded",
      "health.unhealthy": "unhealthy",
      "health.key": "key needed",
      "health.offline": "unreachable",
      "key.label": "API key",
      "key.placeholder": "none needed without keys",
      "key.save": "Save",
      "key.clear": "Forget",
      "key.saved": "API key saved in this browser.",
      "key.cleared": "API key removed from this browser.",
      "key.invalid": "An API key is letters, digits and punctuation, without spaces: not saved.",
      "ask.title": "Ask your documents",
      "ask.question": "Question",
      "ask.placeholder": "e.g. How do I switch to Ollama?",
      "ask.backend": "Backend",
      "ask.adapter": "Adapter",
      "ask.collection": "Collection",
      "ask.submit": "Ask",
      "ask.citations": "Cite the passages used",
      "sources.cited": "cited in the answer",
      "ask.stop": "Stop",
      "ask.waiting": "Searching the documents…",
      "ask.generating": "Writing the answer…",
      "ask.done": "Done.",
      "ask.stopped": "Stopped.",
      "ask.empty": "Type a question first.",
      "ask.noMix": "Tick at least one adapter for the mix.",
      "ask.cut": "The answer stopped before it was complete (the connection closed).",
      "backend.active": "the active one",
      "backend.lora": "local model (LoRA)",
      "backend.ollama": "Ollama",
      "adapter.default": "server default",
      "adapter.defaultNamed": "server default ({name})",
      "adapter.base": "base model, no adapter",
      "adapter.mix": "weighted mix…",
      "adapter.ollama": "(not used by Ollama)",
      "mix.legend": "Weighted mix: tick adapters and give each a weight",
      "collection.default": "default",
      "collection.count": ["{name} ({n} document)", "{name} ({n} documents)"],
      "answer.title": "Answer",
      "answer.meta": "answered by {model}{adapters} in {seconds} s, {tokens} tokens, finished: {finish}",
      "answer.adapters": " with {adapters}",
      "sources.title": "Sources",
      "sources.none": "No sources yet.",
      "sources.score": "score {score} ({kind})",
      "sources.chunk": "chunk {n}",
      "server.title": "Server",
      "server.active": "Active backend:",
      "server.switch": "Switch the active backend",
      "server.switchTo": "Make {backend} the active backend",
      "server.switchHint": "Switching changes the default for every caller (admin key).",
      "server.switched": "The active backend is now {backend}.",
      "server.base": "base model",
      "server.adapters": "adapters",
      "server.device": "device",
      "server.none": "none",
      "documents.title": "Documents",
      "documents.file": "File",
      "documents.collection": "Collection",
      "documents.upload": "Upload",
      "documents.refresh": "Refresh",
      "documents.source": "File",
      "documents.chunks": "Chunks",
      "documents.ingested": "Added",
      "documents.delete": "Delete",
      "documents.confirmDelete": "Delete {source} from the collection {collection}?",
      "documents.missing": "This server has no documents API (yet): documents are added with scripts/ingest.py.",
      "documents.admin": "Managing documents needs an admin API key.",
      "documents.none": "No documents in this collection.",
      "documents.count": ["{n} document.", "{n} documents."],
      "documents.pickFile": "Choose a file to upload.",
      "documents.uploaded": ["Added {source} to {collection} ({n} chunk).",
        "Added {source} to {collection} ({n} chunks)."],
      "documents.already": ["{source} is already in {collection} with the same content ({n} chunk): nothing added.",
        "{source} is already in {collection} with the same content ({n} chunks): nothing added."],
      "documents.deleted": ["Deleted {source} ({n} chunk).", "Deleted {source} ({n} chunks)."],
      "error.network": "The server cannot be reached: is it running? ({detail})",
      "error.http": "{message} (HTTP {status} {code})",
      "error.stream": "{message} ({code})",
      "error.keyHint": "Enter an API key at the top of the page.",
      "error.adminHint": "This needs an admin API key.",
      "error.info": "Could not read what the server offers",
      "error.ask": "The question failed",
      "error.switch": "The backend was not switched",
      "error.documents": "Documents",
      "error.script": "The page hit an error",
      "message.close": "Close",
    },
    zh: {
      "lang.label": "语言",
      "health.unknown": "检查中…",
      "health.healthy": "正常",
      "health.degraded": "部分可用",
      "health.unhealthy": "不可用",
      "health.key": "需要密钥",
      "health.offline": "无法连接",
      "key.label": "API 密钥",
      "key.placeholder": "服务未设密钥时无需填写",
      "key.save": "保存",
      "key.clear": "清除",
      "key.saved": "API 密钥已保存在此浏览器中。",
      "key.cleared": "已从此浏览器中删除 API 密钥。",
      "key.invalid": "API 密钥只能包含字母、数字和标点，不能有空格：未保存。",
      "ask.title": "向你的文档提问",
      "ask.question": "问题",
      "ask.placeholder": "例如：如何切换到 Ollama？",
      "ask.backend": "后端",
      "ask.adapter": "适配器",
      "ask.collection": "文档集",
      "ask.submit": "提问",
      "ask.citations": "引用所用的片段",
      "sources.cited": "回答引用了此处",
      "ask.stop": "停止",
      "ask.waiting": "正在检索文档…",
      "ask.generating": "正在生成回答…",
      "ask.done": "完成。",
      "ask.stopped": "已停止。",
      "ask.empty": "请先输入问题。",
      "ask.noMix": "请至少勾选一个适配器用于混合。",
      "ask.cut": "回答未完成就中断了（连接已关闭）。",
      "backend.active": "当前启用的后端",
      "backend.lora": "本地模型（LoRA）",
      "backend.ollama": "Ollama",
      "adapter.default": "服务器默认",
      "adapter.defaultNamed": "服务器默认（{name}）",
      "adapter.base": "基础模型，不用适配器",
      "adapter.mix": "加权混合…",
      "adapter.ollama": "（Ollama 不使用适配器）",
      "mix.legend": "加权混合：勾选适配器并为每个设置权重",
      "collection.default": "default",
      "collection.count": "{name}（{n} 个文档）",
      "answer.title": "回答",
      "answer.meta": "由 {model}{adapters} 回答，用时 {seconds} 秒，{tokens} 个 token，结束原因：{finish}",
      "answer.adapters": "（适配器 {adapters}）",
      "sources.title": "来源",
      "sources.none": "暂无来源。",
      "sources.score": "得分 {score}（{kind}）",
      "sources.chunk": "第 {n} 段",
      "server.title": "服务器",
      "server.active": "当前后端：",
      "server.switch": "切换当前后端",
      "server.switchTo": "将 {backend} 设为当前后端",
      "server.switchHint": "切换会改变所有调用者的默认后端（需要管理员密钥）。",
      "server.switched": "当前后端已切换为 {backend}。",
      "server.base": "基础模型",
      "server.adapters": "适配器",
      "server.device": "设备",
      "server.none": "无",
      "documents.title": "文档",
      "documents.file": "文件",
      "documents.collection": "文档集",
      "documents.upload": "上传",
      "documents.refresh": "刷新",
      "documents.source": "文件",
      "documents.chunks": "分段",
      "documents.ingested": "添加时间",
      "documents.delete": "删除",
      "documents.confirmDelete": "从文档集 {collection} 中删除 {source}？",
      "documents.missing": "此服务器（暂时）没有文档接口：请用 scripts/ingest.py 添加文档。",
      "documents.admin": "管理文档需要管理员 API 密钥。",
      "documents.none": "此文档集中没有文档。",
      "documents.count": "共 {n} 个文档。",
      "documents.pickFile": "请选择要上传的文件。",
      "documents.uploaded": "已将 {source} 添加到 {collection}（{n} 个分段）。",
      "documents.already": "{collection} 中已有内容相同的 {source}（{n} 个分段）：未重复添加。",
      "documents.deleted": "已删除 {source}（{n} 个分段）。",
      "error.network": "无法连接服务器：服务是否在运行？（{detail}）",
      "error.http": "{message}（HTTP {status} {code}）",
      "error.stream": "{message}（{code}）",
      "error.keyHint": "请在页面顶部输入 API 密钥。",
      "error.adminHint": "此操作需要管理员 API 密钥。",
      "error.info": "无法读取服务器提供的选项",
      "error.ask": "提问失败",
      "error.switch": "后端未切换",
      "error.documents": "文档",
      "error.script": "页面出错",
      "message.close": "关闭",
    },
  };

  // What the server reported, kept so that a language switch can draw everything again.
  const state = {
    lang: "en",
    info: null, // /model_info
    adapters: [], // adapter names
    defaultAdapter: null,
    collections: null, // null: no collections API, the server's default collection is used
    health: null, // {kind: "status"|"key"|"offline", status, components}
    keyRefused: false, // the server answered 401 to the key (or to no key)
    lastResponse: null, // the last AskResponse shown
    controller: null, // AbortController of the question in flight
    documents: null, // {kind: "list", items} | {kind: "missing"|"admin"}
  };

  const $ = (id) => document.getElementById(id);

  // ---- text ----------------------------------------------------------------------------------------------

  // `params.n` picks the singular or plural of a text given as [one, many] (English; Chinese has one form).
  function t(key, params) {
    const table = TEXT[state.lang] || TEXT.en;
    let text = table[key] !== undefined ? table[key] : TEXT.en[key] !== undefined ? TEXT.en[key] : key;
    if (Array.isArray(text)) text = params && Number(params.n) === 1 ? text[0] : text[1];
    if (params) {
      text = text.replace(/\{(\w+)\}/g, (whole, name) => (params[name] !== undefined ? String(params[name]) : whole));
    }
    return text;
  }

  function chooseLanguage() {
    const saved = safeStorage("get", LANG_STORAGE);
    if (saved === "zh" || saved === "en") return saved;
    const wanted = (navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language]);
    for (const tag of wanted) {
      const lower = String(tag || "").toLowerCase();
      if (lower.startsWith("zh")) return "zh";
      if (lower.startsWith("en")) return "en";
    }
    return "en";
  }

  function applyLanguage() {
    document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
    $("lang").value = state.lang;
    for (const element of document.querySelectorAll("[data-i18n]")) element.textContent = t(element.dataset.i18n);
    for (const element of document.querySelectorAll("[data-i18n-placeholder]")) {
      element.placeholder = t(element.dataset.i18nPlaceholder);
    }
    renderAdapters();
    renderCollections();
    renderServer();
    renderHealth();
    renderDocuments();
    if (state.lastResponse) renderMeta(state.lastResponse);
    const asking = $("ask-state").dataset.state;
    $("ask-state").textContent = asking ? t(asking) : "";
  }

  // ---- storage (it can be off: private windows, policies) ----------------------------------------------------

  function safeStorage(action, name, value) {
    try {
      if (action === "get") return window.localStorage.getItem(name);
      if (action === "set") window.localStorage.setItem(name, value);
      if (action === "remove") window.localStorage.removeItem(name);
    } catch (error) {
      return null;
    }
    return null;
  }

  // ---- messages ------------------------------------------------------------------------------------------

  // One message per topic: a retried action replaces its old message instead of piling up.
  function showMessage(topic, kind, text) {
    const box = $("messages");
    let item = box.querySelector(`[data-topic="${topic}"]`);
    if (!item) {
      item = document.createElement("div");
      item.dataset.topic = topic;
      const body = document.createElement("span");
      body.className = "message-text";
      const close = document.createElement("button");
      close.type = "button";
      close.className = "message-close";
      close.textContent = "×";
      close.addEventListener("click", () => item.remove());
      item.append(body, close);
      box.append(item);
    }
    item.className = `message message-${kind}`;
    item.setAttribute("role", kind === "error" ? "alert" : "status");
    item.querySelector(".message-close").title = t("message.close");
    item.querySelector(".message-text").textContent = text;
    // Confirmations fade after a while; errors stay until closed or replaced, so none is missed.
    window.clearTimeout(item.dataset.timer);
    if (kind === "info") item.dataset.timer = window.setTimeout(() => item.remove(), INFO_FOR_MS);
  }

  function clearMessage(topic) {
    const item = $("messages").querySelector(`[data-topic="${topic}"]`);
    if (item) item.remove();
  }

  function showError(topic, prefixKey, error) {
    showMessage(topic, "error", `${t(prefixKey)}: ${describeError(error)}`);
  }

  function describeError(error) {
    if (error instanceof ApiError) {
      if (error.status === 0) return t("error.network", { detail: error.message });
      if (error.status === STREAM_ERROR) return t("error.stream", { message: error.message, code: error.code });
      let text = t("error.http", { message: error.message, status: error.status, code: error.code });
      if (error.status === 401) text += " " + t("error.keyHint");
      if (error.status === 403) text += " " + t("error.adminHint");
      return text;
    }
    return String((error && error.message) || error);
  }

  // ---- HTTP ----------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = safeStorage("get", KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  async function send(path, options) {
    const init = Object.assign({}, options || {});
    init.headers = authHeaders(init.headers);
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      if (error && error.name === "AbortError") throw error;
      throw new ApiError(0, "network", String((error && error.message) || error));
    }
    return response;
  }

  // The error in a response: ours is {"error": code, "message": text}; OpenAI's (under /v1) nests it.
  async function errorOf(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (body && typeof body.error === "string") {
      return new ApiError(response.status, body.error, String(body.message || body.error));
    }
    if (body && body.error && typeof body.error === "object") {
      return new ApiError(response.status, String(body.error.code || body.error.type || "error"),
        String(body.error.message || ""));
    }
    if (body && body.detail) return new ApiError(response.status, "error", JSON.stringify(body.detail));
    return new ApiError(response.status, "http_error", response.statusText || "no readable answer");
  }

  async function getJson(path, okStatuses) {
    const response = await send(path, { headers: { Accept: "application/json" } });
    if (!response.ok && !(okStatuses || []).includes(response.status)) throw await errorOf(response);
    try {
      return await response.json();
    } catch (error) {
      throw new ApiError(response.status, "invalid_response", "the answer is not JSON");
    }
  }

  async function postJson(path, body) {
    const response = await send(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  // ---- what the server offers ----------------------------------------------------------------------------

  async function loadServer() {
    try {
      const info = await getJson("/model_info");
      state.info = info;
      state.defaultAdapter = info.default_adapter || null;
      let names = Array.isArray(info.adapters) ? info.adapters.map(String) : null;
      if (names === null) {
        // /model_info lists adapters only once the local model is described there; /v1/models lists them too.
        try {
          const models = await getJson("/v1/models");
          names = (models.data || []).filter((card) => card.parent).map((card) => String(card.id));
        } catch (error) {
          names = [];
        }
      }
      state.adapters = names;
      state.keyRefused = false;
      clearMessage("server");
    } catch (error) {
      state.info = null;
      state.adapters = [];
      state.defaultAdapter = null;
      state.keyRefused = error instanceof ApiError && error.status === 401;
      showError("server", "error.info", error);
    }
    if (!state.keyRefused) await loadCollections();
    renderAdapters();
    renderServer();
  }

  async function loadCollections() {
    try {
      const response = await send("/collections", { headers: { Accept: "application/json" } });
      clearMessage("collections");
      if (response.status === 404 || response.status === 405) {
        state.collections = null; // not on this server (yet): ask without naming one
      } else if (!response.ok) {
        state.collections = null;
        if (response.status !== 401) showError("collections", "error.info", await errorOf(response));
      } else {
        const body = await response.json();
        state.collections = Array.isArray(body.collections) ? body.collections : null;
      }
    } catch (error) {
      state.collections = null;
    }
    renderCollections();
  }

  function option(value, label) {
    const element = document.createElement("option");
    element.value = value;
    element.textContent = label;
    return element;
  }

  function renderAdapters() {
    const select = $("adapter");
    const previous = select.value;
    const defaultLabel = state.defaultAdapter
      ? t("adapter.defaultNamed", { name: state.defaultAdapter })
      : t("adapter.default");
    const options = [option("", defaultLabel), option(BASE, t("adapter.base"))];
    for (const name of state.adapters) options.push(option(name, name));
    if (state.adapters.length) options.push(option(MIX, t("adapter.mix")));
    select.replaceChildren(...options);
    if ([...select.options].some((item) => item.value === previous)) select.value = previous;
    renderMix();
    adapterUsable();
  }

  function renderMix() {
    const rows = $("mix-rows");
    const kept = {};
    for (const row of rows.querySelectorAll(".mix-row")) {
      kept[row.dataset.name] = { on: row.querySelector("input[type=checkbox]").checked,
        weight: row.querySelector("input[type=number]").value };
    }
    rows.replaceChildren();
    for (const name of state.adapters) {
      const row = document.createElement("label");
      row.className = "mix-row";
      row.dataset.name = name;
      const tick = document.createElement("input");
      tick.type = "checkbox";
      tick.checked = kept[name] ? kept[name].on : true;
      const label = document.createElement("span");
      label.textContent = name;
      const weight = document.createElement("input");
      weight.type = "number";
      weight.step = "0.1";
      weight.min = "-10";
      weight.max = "10";
      weight.value = kept[name] ? kept[name].weight : String(+(1 / state.adapters.length).toFixed(3));
      row.append(tick, label, weight);
      rows.append(row);
    }
    $("mix").hidden = $("adapter").value !== MIX;
  }

  // Adapters belong to the local model; a question for Ollama cannot use one.
  function adapterUsable() {
    const backend = $("backend").value;
    const active = state.info ? state.info.active_backend : null;
    const usable = backend === "lora" || (backend === "" && active !== "ollama");
    $("adapter").disabled = !usable;
    $("adapter").title = usable ? "" : t("adapter.ollama");
    $("mix").hidden = !usable || $("adapter").value !== MIX;
    return usable;
  }

  function renderCollections() {
    const select = $("collection");
    const previous = select.value;
    const items = state.collections && state.collections.length
      ? state.collections.map((c) => option(String(c.name), c.documents !== undefined
        ? t("collection.count", { name: c.name, n: c.documents }) : String(c.name)))
      : [option("default", t("collection.default"))];
    select.replaceChildren(...items);
    if ([...select.options].some((item) => item.value === previous)) select.value = previous;
  }

  function backendName(name) {
    return name === "ollama" ? t("backend.ollama") : name === "lora" ? t("backend.lora") : String(name || "?");
  }

  function renderServer() {
    const active = state.info ? state.info.active_backend || (state.info.using_lora ? "lora" : "ollama") : null;
    $("active-backend").textContent = active ? backendName(active) : "?";
    $("active-backend").dataset.backend = active || "";
    const button = $("switch-button");
    button.disabled = !active;
    button.textContent = active
      ? t("server.switchTo", { backend: backendName(active === "lora" ? "ollama" : "lora") })
      : t("server.switch");
    const facts = $("server-facts");
    facts.replaceChildren();
    if (!state.info) return;
    const rows = [
      [t("server.base"), state.info.base_model],
      [t("server.adapters"), state.adapters.length ? state.adapters.join(", ") : t("server.none")],
      [t("server.device"), state.info.device],
      ["Ollama", state.info.ollama_model],
    ];
    for (const [name, value] of rows) {
      const term = document.createElement("dt");
      term.textContent = name;
      const detail = document.createElement("dd");
      detail.textContent = value === undefined || value === null ? "?" : String(value);
      facts.append(term, detail);
    }
  }

  async function switchBackend() {
    const active = state.info ? state.info.active_backend : null;
    if (!active) return;
    const target = active === "lora" ? "ollama" : "lora";
    $("switch-button").disabled = true;
    try {
      const reply = await postJson("/switch_model", { use_lora: target === "lora" });
      showMessage("switch", "info", t("server.switched", { backend: backendName(reply.active_backend) }));
    } catch (error) {
      showError("switch", "error.switch", error);
    }
    await loadServer();
    await loadHealth();
  }

  // ---- health --------------------------------------------------------------------------------------------

  async function loadHealth() {
    try {
      // 503 still carries the report (the active backend or the store cannot serve).
      const body = await getJson("/health", [503]);
      // component_status: each component's "healthy" / "unhealthy" (components holds the design card's booleans)
      state.health = { kind: "status", status: body.status, components: body.component_status || {} };
    } catch (error) {
      state.health = { kind: error instanceof ApiError && error.status === 401 ? "key"
        : error instanceof ApiError && error.status === 0 ? "offline" : "status", status: "unhealthy",
      components: {}, detail: describeError(error) };
    }
    renderHealth();
  }

  function renderHealth() {
    const badge = $("health");
    const health = state.health;
    if (!health) {
      badge.className = "badge badge-unknown";
      badge.dataset.status = "unknown";
      badge.textContent = t("health.unknown");
      return;
    }
    const kind = health.kind === "status" ? health.status : health.kind;
    badge.className = `badge badge-${kind}`;
    badge.dataset.status = kind;
    badge.textContent = t(`health.${kind}`);
    const lines = Object.entries(health.components).map(([name, value]) => `${name}: ${value}`);
    if (health.detail) lines.push(health.detail);
    badge.title = lines.join("\n");
  }

  // ---- asking --------------------------------------------------------------------------------------------

  function requestBody(query) {
    const body = { query, stream: true };
    const backend = $("backend").value;
    if (backend) body.use_lora = backend === "lora";
    if (adapterUsable()) {
      const adapter = $("adapter").value;
      if (adapter === BASE) body.adapter = BASE;
      else if (adapter === MIX) {
        const parts = [];
        for (const row of $("mix-rows").querySelectorAll(".mix-row")) {
          if (!row.querySelector("input[type=checkbox]").checked) continue;
          const weight = Number(row.querySelector("input[type=number]").value);
          parts.push({ name: row.dataset.name, weight: Number.isFinite(weight) ? weight : 1 });
        }
        if (!parts.length) return null;
        body.adapters = parts;
      } else if (adapter) body.adapter = adapter;
    }
    if (state.collections) body.collection = $("collection").value;
    if ($("citations").checked) body.citations = true;
    return body;
  }

  function setBusy(busy, stateKey) {
    $("ask-button").disabled = busy;
    $("stop-button").disabled = !busy;
    $("answer").classList.toggle("streaming", busy);
    $("ask-state").textContent = stateKey ? t(stateKey) : "";
    $("ask-state").dataset.state = stateKey || "";
  }

  async function askQuestion(event) {
    event.preventDefault();
    if (state.controller) return;
    const query = $("question").value;
    if (!query.trim()) {
      showMessage("ask", "error", t("ask.empty"));
      $("question").focus();
      return;
    }
    const body = requestBody(query);
    if (body === null) {
      showMessage("ask", "error", t("ask.noMix"));
      return;
    }
    clearMessage("ask");
    state.lastResponse = null;
    $("answer").textContent = "";
    $("answer-meta").textContent = "";
    $("answer-notice").hidden = true;
    renderSources([]);
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true, "ask.waiting");
    try {
      const response = await send("/ask", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw await errorOf(response);
      const finished = await readEvents(response, {
        delta(data) {
          if ($("ask-state").dataset.state !== "ask.generating") setBusy(true, "ask.generating");
          $("answer").append(document.createTextNode(String(data.delta || "")));
        },
        done(data) {
          showResponse(data);
        },
        error(data) {
          throw new ApiError(STREAM_ERROR, String(data.error || "error"), String(data.message || ""));
        },
      });
      if (!finished) throw new Error(t("ask.cut"));
      setBusy(false, "ask.done");
    } catch (error) {
      if (error && error.name === "AbortError") {
        setBusy(false, "ask.stopped");
      } else {
        setBusy(false, "");
        showError("ask", "error.ask", error);
      }
    } finally {
      state.controller = null;
      $("answer").classList.remove("streaming");
    }
  }

  // Server-Sent Events from a fetch body (EventSource cannot POST or send a key). True when a `done` arrived.
  async function readEvents(response, handlers) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    let name = "message";
    let data = [];
    let finished = false;
    const dispatch = () => {
      if (data.length) {
        const payload = JSON.parse(data.join("\n"));
        if (name === "done") finished = true;
        if (handlers[name]) handlers[name](payload);
      }
      name = "message";
      data = [];
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
        const lines = buffer.split("\n");
        buffer = done ? "" : lines.pop();
        for (const raw of lines) {
          const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
          if (line === "") dispatch();
          else if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (done) break;
      }
      dispatch(); // a last event without its blank line
    } catch (error) {
      reader.cancel().catch(() => undefined);
      throw error;
    }
    return finished;
  }

  function showResponse(data) {
    state.lastResponse = data;
    $("answer").textContent = String(data.answer || "");
    renderMeta(data);
    const notice = $("answer-notice");
    notice.hidden = !data.notice;
    notice.textContent = data.notice ? String(data.notice) : "";
    renderSources(Array.isArray(data.source_documents) ? data.source_documents : [],
                  Array.isArray(data.citations) ? data.citations : []);
  }

  function renderMeta(data) {
    const meta = $("answer-meta");
    meta.textContent = t("answer.meta", {
      model: String(data.model_used || "?"),
      adapters: data.adapters ? t("answer.adapters", { adapters: data.adapters }) : "",
      seconds: typeof data.processing_time === "number" ? data.processing_time.toFixed(2) : "?",
      tokens: data.usage ? data.usage.completion_tokens : "?",
      finish: String(data.finish_reason || "?"),
    });
    meta.dataset.modelUsed = String(data.model_used || "");
    meta.dataset.adapters = String(data.adapters || "");
  }

  function renderSources(sources, citations = []) {
    const list = $("sources");
    list.replaceChildren();
    $("sources-empty").hidden = sources.length > 0;
    for (const [position, source] of sources.entries()) {
      const metadata = source.metadata || {};
      const item = document.createElement("li");
      item.className = "source";
      const head = document.createElement("div");
      head.className = "source-head";
      const file = document.createElement("span");
      file.className = "source-file";
      file.textContent = String(metadata.source || "?");
      const score = document.createElement("span");
      score.className = "source-score";
      score.textContent = t("sources.score", {
        score: typeof source.score === "number" ? source.score.toFixed(3) : "?",
        kind: String(source.score_kind || "?"),
      });
      head.append(file, score);
      if (metadata.chunk_index !== undefined) {
        const chunk = document.createElement("span");
        chunk.className = "source-chunk";
        chunk.textContent = t("sources.chunk", { n: metadata.chunk_index });
        head.append(chunk);
      }
      const passage = document.createElement("blockquote");
      passage.className = "source-passage";
      const quotes = citations.filter((c) => c.source_index === position + 1).map((c) => String(c.quote || ""));
      appendMarked(passage, String(source.content || ""), quotes);
      item.append(head, passage);
      list.append(item);
    }
  }

  // `text` into `parent`, each of `quotes` (verbatim sentences of it) in a <mark>: text nodes only, never HTML.
  function appendMarked(parent, text, quotes) {
    let rest = text;
    for (;;) {
      let first = -1;
      let quote = "";
      for (const candidate of quotes) {
        const at = candidate ? rest.indexOf(candidate) : -1;
        if (at >= 0 && (first < 0 || at < first)) [first, quote] = [at, candidate];
      }
      if (first < 0) break;
      parent.append(document.createTextNode(rest.slice(0, first)));
      const mark = document.createElement("mark");
      mark.className = "citation";
      mark.title = t("sources.cited");
      mark.textContent = quote;
      parent.append(mark);
      rest = rest.slice(first + quote.length);
    }
    parent.append(document.createTextNode(rest));
  }

  // ---- documents -----------------------------------------------------------------------------------------

  async function loadDocuments() {
    try {
      const response = await send("/documents", { headers: { Accept: "application/json" } });
      if (response.status === 404 || response.status === 405) state.documents = { kind: "missing" };
      else if (response.status === 401 || response.status === 403) state.documents = { kind: "admin" };
      else if (!response.ok) throw await errorOf(response);
      else {
        const body = await response.json();
        state.documents = { kind: "list", items: Array.isArray(body.documents) ? body.documents : [] };
      }
      clearMessage("documents-list");
    } catch (error) {
      state.documents = { kind: "error" };
      showError("documents-list", "error.documents", error);
    }
    renderDocuments();
  }

  function renderDocuments() {
    const docs = state.documents;
    const status = $("documents-status");
    const table = $("documents-table");
    const usable = Boolean(docs && docs.kind === "list");
    $("documents-controls").disabled = !usable;
    $("documents-panel").dataset.state = docs ? docs.kind : "";
    table.hidden = !usable || !docs.items.length;
    if (!docs) {
      status.textContent = "";
      return;
    }
    if (docs.kind === "missing") status.textContent = t("documents.missing");
    else if (docs.kind === "admin") status.textContent = t("documents.admin");
    else if (docs.kind === "error") status.textContent = "";
    else status.textContent = docs.items.length ? t("documents.count", { n: docs.items.length })
      : t("documents.none");
    const rows = [];
    for (const doc of usable ? docs.items : []) {
      const row = document.createElement("tr");
      row.className = "document";
      row.dataset.documentId = String(doc.document_id || "");
      const values = { source: doc.source, collection: doc.collection, chunks: doc.chunks, added: doc.ingested_at };
      for (const [name, value] of Object.entries(values)) {
        const cell = document.createElement("td");
        cell.className = `document-${name}`;
        cell.textContent = value === undefined || value === null ? "" : String(value);
        row.append(cell);
      }
      const cell = document.createElement("td");
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "document-delete";
      remove.textContent = t("documents.delete");
      remove.addEventListener("click", () => deleteDocument(doc));
      cell.append(remove);
      row.append(cell);
      rows.push(row);
    }
    $("documents-body").replaceChildren(...rows);
  }

  // An upload or a deletion, then the list and the collection picker read again (a first upload makes a new
  // collection to ask in). The panel is aria-busy until both are redrawn, and its buttons wait meanwhile.
  async function changeDocuments(work) {
    const panel = $("documents-panel");
    panel.setAttribute("aria-busy", "true");
    $("upload-button").disabled = true;
    try {
      await work();
    } catch (error) {
      showError("documents", "error.documents", error);
    }
    try {
      await Promise.all([loadDocuments(), loadCollections()]);
    } finally {
      $("upload-button").disabled = false;
      panel.removeAttribute("aria-busy");
    }
  }

  async function uploadDocument(event) {
    event.preventDefault();
    if ($("documents-panel").getAttribute("aria-busy") === "true") return;
    const file = $("upload-file").files[0];
    if (!file) {
      showMessage("documents", "error", t("documents.pickFile"));
      return;
    }
    const form = new FormData();
    form.append("file", file);
    const collection = $("upload-collection").value.trim();
    if (collection) form.append("collection", collection);
    await changeDocuments(async () => {
      // No Content-Type here: the browser writes the multipart boundary itself.
      const response = await send("/documents", { method: "POST", body: form, headers: { Accept: "application/json" } });
      if (!response.ok) throw await errorOf(response);
      const doc = await response.json();
      // 201: indexed now; 200: the same content was there already, and nothing was added.
      const key = response.status === 201 ? "documents.uploaded" : "documents.already";
      showMessage("documents", "info", t(key, Object.assign({ n: doc.chunks }, doc)));
      $("upload-file").value = "";
    });
  }

  async function deleteDocument(doc) {
    if ($("documents-panel").getAttribute("aria-busy") === "true") return;
    if (!window.confirm(t("documents.confirmDelete", doc))) return;
    await changeDocuments(async () => {
      const response = await send(`/documents/${encodeURIComponent(doc.document_id)}`, { method: "DELETE" });
      if (!response.ok) throw await errorOf(response);
      const gone = await response.json();
      showMessage("documents", "info", t("documents.deleted", Object.assign({ n: gone.chunks }, gone)));
    });
  }

  // ---- the API key ---------------------------------------------------------------------------------------

  function saveKey(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    // A header value must be visible ASCII; anything else would make every request fail in fetch itself.
    if (key && !/^[\x21-\x7e]+$/.test(key)) {
      showMessage("key", "error", t("key.invalid"));
      return;
    }
    if (key) safeStorage("set", KEY_STORAGE, key);
    else safeStorage("remove", KEY_STORAGE);
    showMessage("key", "info", key ? t("key.saved") : t("key.cleared"));
    refreshAll();
  }

  function forgetKey() {
    safeStorage("remove", KEY_STORAGE);
    $("api-key").value = "";
    showMessage("key", "info", t("key.cleared"));
    refreshAll();
  }

  // /model_info first: when it refuses the key, the other calls would be refused too (and each invalid key
  // counts towards the server's throttle), so the page says so once instead.
  async function refreshAll() {
    state.health = null; // "checking…" until the new key's answer is in
    renderHealth();
    await loadServer();
    if (state.keyRefused) {
      state.health = { kind: "key", status: "unhealthy", components: {} };
      state.documents = { kind: "admin" };
      renderHealth();
      renderDocuments();
      return;
    }
    await Promise.all([loadHealth(), loadDocuments()]);
  }

  // ---- start ---------------------------------------------------------------------------------------------

  function start() {
    state.lang = chooseLanguage();
    $("api-key").value = safeStorage("get", KEY_STORAGE) || "";
    $("lang").addEventListener("change", () => {
      state.lang = $("lang").value === "zh" ? "zh" : "en";
      safeStorage("set", LANG_STORAGE, state.lang);
      applyLanguage();
    });
    $("key-form").addEventListener("submit", saveKey);
    $("key-clear").addEventListener("click", forgetKey);
    $("ask-form").addEventListener("submit", askQuestion);
    $("stop-button").addEventListener("click", () => state.controller && state.controller.abort());
    $("question").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("ask-form").requestSubmit();
    });
    $("backend").addEventListener("change", adapterUsable);
    $("adapter").addEventListener("change", adapterUsable);
    $("switch-button").addEventListener("click", switchBackend);
    $("upload-form").addEventListener("submit", uploadDocument);
    $("documents-refresh").addEventListener("click", loadDocuments);
    applyLanguage();
    refreshAll().then(() => {
      document.body.dataset.ready = "true";
    });
    window.setInterval(() => {
      // A missing or wrong key stays wrong until the user saves another (which checks at once); asking again
      // with it would only count against the server's limit on invalid keys.
      if (!state.keyRefused) loadHealth();
    }, HEALTH_EVERY_MS);
  }

  // Whatever goes wrong is said on the page; the page itself never goes blank.
  window.addEventListener("error", (event) => {
    showMessage("script", "error", `${t("error.script")}: ${event.message}`);
  });
  window.addEventListener("unhandledrejection", (event) => {
    showMessage("script", "error", `${t("error.script")}: ${describeError(event.reason)}`);
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
