// The page of `medxai serve` (docs/serve.md): upload an image, see the decision, the calibrated probabilities and the
// heatmap blended over the image at its original resolution. Plain JS, nothing loaded from outside the service.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    summary: $("model-summary"), details: $("model-details"), clinical: $("clinical-banner"),
    intendedUse: $("intended-use"), dropzone: $("dropzone"), input: $("file-input"), method: $("method"),
    opacity: $("opacity"), opacityValue: $("opacity-value"), tokenForm: $("token-form"), token: $("token"),
    status: $("status"), result: $("result"), ood: $("ood-banner"), oodScore: $("ood-score"),
    oodReasons: $("ood-reasons"), label: $("label"), rule: $("decision-rule"), probabilities: $("probabilities"),
    canvas: $("canvas"), caption: $("caption"), download: $("download"), meta: $("meta"), history: $("history"),
    historyEmpty: $("history-empty"), methodNote: $("method-note"),
  };
  const state = {
    token: null,          // the bearer token, in memory only: never stored, never put in a URL
    card: null,           // the normalised model card
    explain: true,        // false with the ONNX Runtime backend: predictions only
    entries: [],          // one per uploaded file: {n, file, method, response, image, heatmap, size, item}
    current: null,
    controller: null,     // aborts the request in flight when a newer one starts
    retry: null,          // what to run again once a token is entered
    opacityTouched: false,
  };

  class ApiError extends Error {
    constructor(status, code, detail, retryAfter) {
      super(detail);
      Object.assign(this, { status, code, detail, retryAfter });
    }
  }

  async function api(path, init = {}) {
    const headers = new Headers(init.headers || {});
    headers.set("Accept", "application/json");
    if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
    let response;
    try {
      response = await fetch(path, { ...init, headers, credentials: "same-origin" });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "network", "The service did not answer; check that it is still running.");
    }
    let body = null;
    try { body = await response.json(); } catch { body = null; }
    if (!response.ok) {
      const detail = (body && (body.detail || body.error)) || response.statusText || `HTTP ${response.status}`;
      throw new ApiError(response.status, (body && body.error) || `http_${response.status}`,
        typeof detail === "string" ? detail : JSON.stringify(detail), response.headers.get("Retry-After"));
    }
    return body;
  }

  // ---- status region: polite progress, errors as alerts -----------------------------------------------------------
  function say(text, busy = false) {
    const line = document.createElement("p");
    if (busy) {
      const spinner = document.createElement("span");
      spinner.className = "spinner";
      spinner.setAttribute("aria-hidden", "true");
      line.append(spinner);
    }
    line.append(text);
    els.status.replaceChildren(line);
  }

  function fail(error, prefix = "") {
    const line = document.createElement("p");
    line.className = "error";
    line.setAttribute("role", "alert");
    const detail = error instanceof ApiError ? `${error.detail}${error.status ? ` (HTTP ${error.status})` : ""}`
      : String(error && error.message ? error.message : error);
    line.textContent = prefix + detail;
    els.status.replaceChildren(line);
  }

  function setBusy(busy) {
    document.body.classList.toggle("busy", busy);
    els.result.setAttribute("aria-busy", String(busy));
    els.dropzone.setAttribute("aria-busy", String(busy));
  }

  function askToken(retry) {
    if (retry) state.retry = retry;  // the model card reloads by itself; keep the upload that was waiting
    els.tokenForm.hidden = false;
    fail(state.token ? "The access token was not accepted; enter it again below."
      : "This service needs an access token: enter it below.");
    els.token.focus();
  }

  // ---- the model card ---------------------------------------------------------------------------------------------
  function normaliseCard(raw) {
    const sources = [raw, raw.model, raw.card].filter((item) => item && typeof item === "object");
    const pick = (...keys) => {
      for (const key of keys) for (const source of sources) if (source[key] !== undefined && source[key] !== null) return source[key];
      return undefined;
    };
    const backend = pick("backend");
    const explain = pick("explain_available");
    const labels = pick("labels", "label_names");
    return {
      id: pick("id", "model_id"), version: pick("version", "medxai_version"), architecture: pick("architecture"),
      labels: Array.isArray(labels) ? labels : [], threshold: pick("threshold"), rule: pick("decision_rule"),
      intendedUse: pick("intended_use"), limitations: pick("limitations"), metrics: pick("metrics"),
      clinicalUse: pick("clinical_use") === true, backend,
      methods: pick("cam_methods") || [], defaultMethod: pick("default_method"),
      explain: explain === undefined ? backend !== "onnxruntime" : explain === true,
    };
  }

  function ruleText(rule, threshold) {
    if (rule) return rule;
    if (threshold && threshold.value !== null && threshold.value !== undefined) {
      return `threshold ${short(threshold.value)} on ${threshold.label || "the positive label"}${threshold.method ? ` (${threshold.method})` : ""}`;
    }
    return "argmax: the most probable label";
  }

  function metricsText(metrics) {
    if (!metrics || typeof metrics !== "object") return "";
    const shown = ["auc", "accuracy", "sensitivity", "specificity"].filter((key) => typeof metrics[key] === "number")
      .map((key) => `${key === "auc" ? "AUC" : key} ${metrics[key].toFixed(3)}`);
    return shown.length ? `${shown.join(", ")}${metrics.n ? ` (${metrics.split || "test"}, n = ${metrics.n})` : ""}` : "";
  }

  function showCard(card) {
    state.card = card;
    const name = `${card.id || "model"}${card.version ? ` (version ${card.version})` : ""}`;
    els.summary.textContent = [name, card.architecture, card.backend && `${card.backend} backend`].filter(Boolean).join(" · ");
    const rows = [
      ["Model", name], ["Architecture", card.architecture], ["Labels", card.labels.join(", ")],
      ["Decision rule", ruleText(card.rule, card.threshold)], ["Backend", card.backend],
      ["Test metrics", metricsText(card.metrics)],
      ["Intended use", card.clinicalUse && card.intendedUse], ["Limitations", card.limitations],
    ];
    els.details.replaceChildren(...rows.filter(([, value]) => value).flatMap(([term, value]) => {
      const dt = document.createElement("dt"); dt.textContent = term;
      const dd = document.createElement("dd"); dd.textContent = value;
      return [dt, dd];
    }));
    els.intendedUse.textContent = card.intendedUse || "This model has not been validated for clinical use.";
    els.clinical.hidden = card.clinicalUse;

    const methods = card.methods.length ? card.methods : ["gradcam"];
    els.method.replaceChildren(...methods.map((method) => new Option(method, method)));
    els.method.value = methods.includes(card.defaultMethod) ? card.defaultMethod : methods[0];
    setExplain(card.explain);
  }

  function setExplain(available) {
    state.explain = available;
    els.method.disabled = !available;
    els.opacity.disabled = !available;
    els.methodNote.hidden = available;
    if (!available) els.method.replaceChildren(new Option("none (ONNX Runtime)", ""));
  }

  async function loadModel(attempt = 0) {
    say("Loading the model card…", true);
    let raw;
    try {
      raw = await api("/v1/model");
    } catch (error) {
      if (error.status === 401) return askToken(null);
      if (error.status === 503 && attempt < 30) {
        say("The model is still loading; trying again shortly…", true);
        setTimeout(() => loadModel(attempt + 1), 1000 * Math.min(10, Number(error.retryAfter) || 2));
        return;
      }
      els.summary.textContent = "The model card could not be loaded.";
      return fail(error, "Model card: ");
    }
    showCard(normaliseCard(raw));
    if (state.retry) return runRetry();
    say(state.explain ? "Ready: drop an image or choose a file."
      : "Ready. Heatmaps need the PyTorch backend; this service runs ONNX Runtime, so only predictions are shown.");
  }

  // ---- images -----------------------------------------------------------------------------------------------------
  function decodePng(base64) {
    if (!base64) return Promise.resolve(null);
    const bytes = Uint8Array.from(atob(base64), (char) => char.charCodeAt(0));
    return createImageBitmap(new Blob([bytes], { type: "image/png" }));
  }

  async function buildEntry(file, method, response) {
    const explanation = response.explanation || null;
    let image = null;
    let heatmap = null;
    if (explanation) {
      image = await decodePng(explanation.image_png || explanation.overlay_png);
      heatmap = explanation.image_png ? await decodePng(explanation.heatmap_png) : null;
    } else {
      try { image = await createImageBitmap(file); } catch { image = null; }  // DICOM, NIfTI: the browser cannot
    }
    const info = response.image || {};
    const width = (explanation && explanation.width) || info.width || (image && image.width) || 0;
    const height = (explanation && explanation.height) || info.height || (image && image.height) || 0;
    return { file, method: explanation ? explanation.method || method : "", response, image, heatmap, size: { width, height } };
  }

  function blend(canvas, entry, width, height) {
    const context = canvas.getContext("2d");
    context.globalAlpha = 1;
    context.clearRect(0, 0, width, height);
    if (entry.image) context.drawImage(entry.image, 0, 0, width, height);
    if (entry.heatmap) {
      context.globalAlpha = Number(els.opacity.value);
      context.drawImage(entry.heatmap, 0, 0, width, height);
      context.globalAlpha = 1;
    }
  }

  function draw(entry) {
    const { width, height } = entry.size;
    if (els.canvas.width !== width) els.canvas.width = width;
    if (els.canvas.height !== height) els.canvas.height = height;
    blend(els.canvas, entry, width, height);
  }

  function percent(value) { return `${(100 * value).toFixed(1)} %`; }
  function short(value) { return String(Number(Number(value).toPrecision(4))); }

  // ---- the result -------------------------------------------------------------------------------------------------
  function renderProbabilities(response) {
    const probabilities = response.probabilities || {};
    const known = state.card ? state.card.labels.filter((label) => label in probabilities) : [];
    const labels = [...known, ...Object.keys(probabilities).filter((label) => !known.includes(label))];
    const threshold = response.threshold && response.threshold.value !== null && response.threshold.value !== undefined
      ? response.threshold : null;
    els.probabilities.replaceChildren(...labels.map((label) => {
      const value = Number(probabilities[label]);
      const bar = document.createElement("div");
      bar.className = "prob-bar";
      bar.dataset.label = label;
      bar.dataset.probability = String(value);
      const name = document.createElement("span");
      name.className = "prob-name";
      name.textContent = label;
      const track = document.createElement("span");
      track.className = "prob-track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "prob-fill";
      fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
      track.append(fill);
      const text = document.createElement("span");
      text.className = "prob-value";
      text.textContent = percent(value);
      if (threshold && threshold.label === label) {
        const mark = document.createElement("span");
        mark.className = "prob-threshold";
        mark.style.left = `${Math.max(0, Math.min(1, threshold.value)) * 100}%`;
        mark.title = `threshold ${short(threshold.value)}`;
        track.append(mark);
        const note = document.createElement("span");
        note.className = "visually-hidden";
        note.textContent = `, threshold ${percent(threshold.value)}`;
        text.append(note);
      }
      if (label === response.label) {
        bar.classList.add("decided");
        const note = document.createElement("span");
        note.className = "visually-hidden";
        note.textContent = ", the decision";
        text.append(note);
      }
      bar.append(name, track, text);
      return bar;
    }));
    if (threshold) {
      const legend = document.createElement("p");
      legend.className = "muted small legend";
      legend.textContent = `The dark mark on the ${threshold.label} bar is the operating threshold, ${short(threshold.value)}.`;
      els.probabilities.append(legend);
    }
  }

  function render(entry) {
    const { response, size } = entry;
    state.current = entry;
    els.result.hidden = false;
    els.label.textContent = response.label;
    els.rule.textContent = `by ${ruleText(response.decision_rule, response.threshold)}`;
    renderProbabilities(response);

    const outOfDomain = response.in_domain === false;
    els.ood.hidden = !outOfDomain;
    if (outOfDomain) {
      const score = Number(response.domain_score);
      els.oodScore.textContent = Number.isFinite(score) ? `Domain score ${score.toFixed(2)}.` : "";
      els.oodReasons.replaceChildren(...(response.domain_reasons || []).map((reason) => {
        const item = document.createElement("li"); item.textContent = reason; return item;
      }));
    }

    const hasPicture = Boolean(entry.image);
    els.canvas.hidden = !hasPicture;
    els.download.disabled = !hasPicture;
    if (hasPicture) draw(entry);
    const format = response.image && response.image.format ? `, ${response.image.format}` : "";
    const explanation = response.explanation;
    const parts = [`Original size ${size.width} × ${size.height} px${format}`];
    parts.push(hasPicture ? "; shown scaled to fit, downloaded at full size." : "; the browser cannot display this file itself.");
    parts.push(explanation ? ` Heatmap: ${explanation.method} for “${explanation.target_label}”.`
      : " No heatmap: class activation maps need the PyTorch backend.");
    els.caption.textContent = parts.join("");
    els.download.textContent = explanation ? "Download overlay" : "Download image";

    const model = response.model || {};
    const latency = Number(response.latency_ms);
    els.meta.textContent = [
      model.id && `Model ${model.id}${model.version ? ` (version ${model.version})` : ""}`,
      Number.isFinite(latency) && `${latency.toFixed(0)} ms`, response.backend && `${response.backend} backend`,
    ].filter(Boolean).join(" · ");
    for (const other of state.entries) {
      other.item.classList.toggle("selected", other === entry);
      other.item.setAttribute("aria-current", String(other === entry));
    }
  }

  // ---- history ----------------------------------------------------------------------------------------------------
  function updateHistoryItem(entry) {
    const button = entry.item;
    const thumb = document.createElement("canvas");
    thumb.className = "thumb";
    thumb.setAttribute("aria-hidden", "true");
    const scale = entry.image ? Math.min(1, 64 / Math.max(entry.size.width, entry.size.height, 1)) : 0;
    thumb.width = Math.max(1, Math.round(entry.size.width * scale));
    thumb.height = Math.max(1, Math.round(entry.size.height * scale));
    if (entry.image) blend(thumb, entry, thumb.width, thumb.height);
    const text = document.createElement("span");
    text.className = "history-text";
    const title = document.createElement("strong");
    const probability = entry.response.probabilities ? entry.response.probabilities[entry.response.label] : undefined;
    title.textContent = `${entry.n}. ${entry.response.label}${probability !== undefined ? ` (${percent(probability)})` : ""}`;
    const sub = document.createElement("span");
    sub.className = "muted small";
    sub.textContent = [entry.file.name || "upload", entry.method, entry.response.in_domain === false && "out of domain"]
      .filter(Boolean).join(" · ");
    text.append(title, sub);
    button.replaceChildren(thumb, text);
  }

  function addToHistory(entry) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "history-item";
    button.addEventListener("click", () => {
      if (state.explain && entry.method && [...els.method.options].some((option) => option.value === entry.method)) {
        els.method.value = entry.method;
      }
      render(entry);
      say(`Showing result ${entry.n}: ${entry.file.name || "upload"}.`);
    });
    item.append(button);
    entry.item = button;
    els.history.append(item);
    els.historyEmpty.hidden = true;
    updateHistoryItem(entry);
  }

  // ---- requests ---------------------------------------------------------------------------------------------------
  async function ask(file, method, signal) {
    const form = new FormData();
    form.append("file", file, file.name || "upload");
    if (state.explain) {
      const query = new URLSearchParams({ layers: "true" });
      if (method) query.set("method", method);
      try {
        return await api(`/v1/explain?${query}`, { method: "POST", body: form, signal });
      } catch (error) {
        if (error.status !== 501) throw error;
        setExplain(false);  // the service has no gradients (ONNX Runtime): predictions only from now on
      }
    }
    return api("/v1/predict", { method: "POST", body: form, signal });
  }

  // Explains `file`; `entry` given: re-explains it in place (another method), else a new history entry.
  async function analyse(file, entry, signal, progress) {
    const method = state.explain ? els.method.value : "";
    const megabytes = file.size >= 1e5 ? `, ${(file.size / 1e6).toFixed(1)} MB` : "";
    say(`Analysing ${file.name || "the upload"}${megabytes}${method ? ` with ${method}` : ""}${progress}…`, true);
    setBusy(true);
    try {
      const response = await ask(file, method, signal);
      const built = await buildEntry(file, method, response);
      if (signal.aborted) return false;
      if (entry) {
        Object.assign(entry, built);
        updateHistoryItem(entry);
      } else {
        entry = { ...built, n: state.entries.length + 1 };
        state.entries.push(entry);
        addToHistory(entry);
      }
      if (!state.opacityTouched && response.explanation && typeof response.explanation.alpha === "number") {
        els.opacity.value = String(response.explanation.alpha);
        showOpacity();
      }
      render(entry);
      const probability = response.probabilities ? response.probabilities[response.label] : undefined;
      say(`${file.name || "Upload"}: ${response.label}${probability !== undefined ? ` (${percent(probability)})` : ""}` +
        `${response.in_domain === false ? "; out of domain, do not trust this result" : ""}.`);
      return true;
    } finally {
      if (!signal.aborted) setBusy(false);
    }
  }

  function startRun() {
    if (state.controller) state.controller.abort();
    state.controller = new AbortController();
    return state.controller.signal;
  }

  async function handleFiles(files, entry = null) {
    if (!files.length) return;
    const signal = startRun();
    for (const [index, file] of files.entries()) {
      if (signal.aborted) return;
      const progress = files.length > 1 ? ` (${index + 1} of ${files.length})` : "";
      try {
        await analyse(file, entry, signal, progress);
      } catch (error) {
        if (signal.aborted || error.name === "AbortError") return;
        setBusy(false);
        if (error.status === 401) return askToken(() => handleFiles(files.slice(index), entry));
        return fail(error, `${file.name || "Upload"}: `);
      }
    }
  }

  function showOpacity() { els.opacityValue.textContent = Number(els.opacity.value).toFixed(2); }

  // ---- wiring -----------------------------------------------------------------------------------------------------
  els.dropzone.addEventListener("click", () => els.input.click());
  els.dropzone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      els.input.click();
    }
  });
  for (const name of ["dragenter", "dragover"]) {
    els.dropzone.addEventListener(name, (event) => {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      els.dropzone.classList.add("dragging");
    });
  }
  els.dropzone.addEventListener("dragleave", (event) => {
    if (!els.dropzone.contains(event.relatedTarget)) els.dropzone.classList.remove("dragging");
  });
  els.dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    els.dropzone.classList.remove("dragging");
    handleFiles(Array.from(event.dataTransfer.files || []));
  });
  // A file dropped beside the zone must not make the browser leave the page to open it.
  for (const name of ["dragover", "drop"]) window.addEventListener(name, (event) => event.preventDefault());

  els.input.addEventListener("change", () => {
    const files = Array.from(els.input.files || []);
    els.input.value = "";  // choosing the same file again is a change too
    handleFiles(files);
  });

  els.method.addEventListener("change", () => {
    if (state.current) handleFiles([state.current.file], state.current);
  });

  els.opacity.addEventListener("input", () => {
    state.opacityTouched = true;
    showOpacity();
    if (state.current && state.current.image) draw(state.current);
  });

  els.download.addEventListener("click", () => {
    const entry = state.current;
    if (!entry || !entry.image) return;
    const name = entry.method ? `overlay-${entry.n}-${entry.method.replace(/[^\w.+-]/g, "-")}.png` : `image-${entry.n}.png`;
    els.canvas.toBlob((blob) => {
      if (!blob) return fail("The picture could not be encoded as PNG.");
      const url = URL.createObjectURL(blob);
      const link = document.createElement("a");
      link.href = url;
      link.download = name;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 30000);
      say(`Saved ${name} (${entry.size.width} × ${entry.size.height} px).`);
    }, "image/png");
  });

  els.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = els.token.value.trim();
    if (!value) return els.token.focus();
    state.token = value;
    els.token.value = "";
    els.tokenForm.hidden = true;
    if (state.card) runRetry(); else loadModel();  // loadModel runs the waiting upload once the card is in
  });

  function runRetry() {
    const retry = state.retry;
    state.retry = null;
    if (retry) retry();
  }

  showOpacity();
  loadModel();
})();
