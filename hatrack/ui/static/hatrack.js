// hatrack dashboard: copy buttons, the live serving poll, and "try it" streaming.
// Vanilla JS, no dependencies; each part runs only where its elements exist.
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };

  document.querySelectorAll("button.copy").forEach(function (btn) {
    btn.addEventListener("click", function () {
      var text = $(btn.dataset.copy).textContent;
      if (navigator.clipboard) { navigator.clipboard.writeText(text).catch(function () {}); }
      btn.textContent = "copied";
      setTimeout(function () { btn.textContent = "copy"; }, 1200);
    });
  });

  // ------------------------------------------------------------ serving: poll a JSON endpoint
  var serving = $("serving");
  if (serving) {
    var cell = function (text, right) {
      var td = document.createElement("td");
      td.textContent = text;
      if (right) { td.className = "r"; }
      return td;
    };
    var show = function (s) {
      $("s-queue").textContent = s.queue_depth;
      $("s-running").textContent = s.running;
      $("s-tps").textContent = s.tokens_per_s.toFixed(1);
      $("s-tokens").textContent = s.tokens_generated;
      $("s-device").textContent = s.device.join(", ") || "-";
      $("s-host").textContent = s.host.join(", ") || "-";
      $("s-disk").textContent = s.disk.join(", ") || "-";
      var body = $("s-models").querySelector("tbody");
      body.replaceChildren();
      s.models.forEach(function (m) {
        var tr = document.createElement("tr");
        tr.append(cell(m.model), cell(String(m.requests), true),
          cell(m.mean_latency_s === null ? "-" : m.mean_latency_s.toFixed(3) + " s", true), cell(String(m.tokens), true));
        body.append(tr);
      });
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    };
    var poll = function () {
      fetch(serving.dataset.src, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (s) { if (s) { show(s); } })
        .catch(function () { $("updated").textContent = "server unreachable"; })
        .finally(function () { setTimeout(poll, 2000); });
    };
    setTimeout(poll, 2000);
  }

  // ------------------------------------------------------------ try it: two streams side by side
  var form = $("try-form");
  if (form) {
    var stream = function (side, prompt, maxTokens) {
      var out = $("answer-" + side), meta = $("meta-" + side), model = $("model-" + side).value;
      var started = performance.now(), tokens = 0;
      out.textContent = "";
      meta.textContent = "waiting…";
      return fetch("/v1/chat/completions", {
        method: "POST",
        credentials: "same-origin",
        // the custom header lets the server take the dashboard's cookie as the key
        headers: { "Content-Type": "application/json", "X-Hatrack-UI": "1" },
        body: JSON.stringify({ model: model, stream: true, max_tokens: maxTokens,
          messages: [{ role: "user", content: prompt }] })
      }).then(function (resp) {
        if (!resp.ok) {
          return resp.json().then(function (e) { meta.textContent = "error: " + e.error.message; });
        }
        var reader = resp.body.getReader(), decoder = new TextDecoder(), buffer = "";
        var pump = function () {
          return reader.read().then(function (r) {
            if (r.done) { return; }
            buffer += decoder.decode(r.value, { stream: true });
            var events = buffer.split("\n\n");
            buffer = events.pop();
            events.forEach(function (ev) {
              ev.split("\n").forEach(function (line) {
                if (line.indexOf("data: ") !== 0) { return; }
                var data = line.slice(6);
                if (data === "[DONE]") {
                  meta.textContent = model + " · " + tokens + " chunks · " + ((performance.now() - started) / 1000).toFixed(2) + " s";
                  out.dataset.done = "1";
                  return;
                }
                var chunk = JSON.parse(data), delta = chunk.choices.length ? chunk.choices[0].delta : {};
                if (delta.content) { out.textContent += delta.content; tokens += 1; }
              });
            });
            return pump();
          });
        };
        return pump();
      }).catch(function (err) { meta.textContent = "error: " + err; });
    };
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var prompt = $("prompt").value, maxTokens = parseInt($("max-tokens").value, 10) || 32;
      ["left", "right"].forEach(function (side) { $("answer-" + side).dataset.done = ""; stream(side, prompt, maxTokens); });
    });
  }
})();
