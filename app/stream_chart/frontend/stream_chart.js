/* Panda's streaming chart: a plotly.js chart that Streamlit updates in place.
 *
 * Speaks Streamlit's custom-component protocol (v1) directly, with no npm package:
 *   to the page    {isStreamlitMessage: true, type: "streamlit:componentReady", apiVersion: 1}
 *   from the page  {type: "streamlit:render", args, theme}          (each refresh)
 *   to the page    {isStreamlitMessage: true, type: "streamlit:setFrameHeight", height}
 *   to the page    {isStreamlitMessage: true, type: "streamlit:setComponentValue", value}
 *
 * What the user did to the view (zoomed ranges, hidden traces, the drag mode) is kept here and
 * written over each new figure before Plotly.react. plotly's own `uirevision` is not enough:
 * it keeps a zoomed range only while the app sends the same value as before the zoom, and the
 * page sends a new loss range whenever the data moves; it also matches traces by index, and
 * traces come and go (validation, interventions, off-scale markers).
 */
"use strict";

(function () {
  const AXIS = /^[xy]axis\d*$/;
  const AXIS_EDIT = /^([xy]axis\d*)\.(range|autorange)\b/;  // "xaxis.range[0]", "yaxis2.autorange"
  const SIZE_EDITS = new Set(["autosize", "width", "height"]);
  const MAX_HOLD_MS = 10000;  // a refresh waits for a drag to end, not for ever
  const CACHE_NAME = "panda-stream-chart";

  const chart = document.getElementById("chart");
  const view = {
    revision: null,  // the page's name for what the axes mean; a new one drops the zoom
    ranges: {},      // axis name -> [low, high] the user zoomed or panned to (plotly units)
    layout: {},      // other layout edits from the modebar: dragmode, hovermode, spikes
    visible: {},     // trace uid (else name) -> true | "legendonly", as the user left it
  };
  // For tests and for a look in the console: draws done, errors, the newest x ("latest").
  const status = {renders: 0, errors: 0, latest: null};
  window.streamChart = {view, status};

  let args = null;       // the newest render message's arguments …
  let theme = null;      // … and the page's theme
  let plotly = null;     // a promise of the loaded plotly.js
  let drawing = false;   // a Plotly.react is running; `again`: draw once more after it
  let again = false;
  let pressed = 0;       // when the pointer went down on the chart (0: it is up)
  let held = false;      // a refresh arrived during a drag
  let holdTimer = null;
  let frameHeight = null;
  let sent;              // the last value sent to the page (JSON text)
  let ids = [];          // trace ids of the last draw, in plotly's order
  let listening = false;

  function post(type, extra) {
    window.parent.postMessage(Object.assign({isStreamlitMessage: true, type}, extra), "*");
  }

  // plotly.js (4.8 MB). Served by `panda dashboard` as a static file (`cacheable`): a plain
  // script URL, which the browser keeps (the file is dated 1970, so its heuristic freshness is
  // years: see app/stream_chart/__init__.py) with the code V8 compiled, so from the third page
  // load on it evaluates in ~0.1 s instead of ~1 s. Otherwise (a page served by a plain
  // `streamlit run`, or a static file that failed to load) from the Cache API when an earlier
  // frame or page load stored it there: Streamlit serves component files as
  // "Cache-Control: public" with no lifetime and no validator, so the HTTP cache would
  // download it again for every chart frame and page load (a blob: URL is never code-cached,
  // hence the static file). The URL carries the plotly version: a new version is a new entry
  // (older ones are dropped). Where the Cache API is missing (a page served over plain http to
  // another host is not a secure context) the plain URL is used.
  async function plotlySource(src, cacheable) {
    const url = new URL(src, document.baseURI).href;
    if (cacheable) {  // the Cache API's copy, from before there was a static file, can go
      if (window.caches) window.caches.delete(CACHE_NAME).catch(() => {});
      return url;
    }
    if (!window.caches) return url;
    try {
      const cache = await window.caches.open(CACHE_NAME);
      let response = await cache.match(url);
      if (!response) {
        response = await fetch(url);
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        await cache.put(url, response.clone());
        for (const old of await cache.keys()) if (old.url !== url) await cache.delete(old);
      }
      return URL.createObjectURL(await response.blob());
    } catch (error) {
      console.warn("stream_chart: plotly.js not cached:", error);
      return url;
    }
  }

  function loadScript(source, src) {
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = source;
      script.onload = () => resolve(window.Plotly);
      script.onerror = () => {
        script.remove();
        reject(new Error(`could not load plotly.js from ${src}`));
      };
      document.head.appendChild(script);
    });
  }

  // The static file first when there is one, else (or when it fails: removed, a proxy that
  // does not pass /app/static/) the component route. A failed load is forgotten, so the next
  // render tries again.
  function loadPlotly(a) {
    if (!plotly) {
      const viaRoute = () => plotlySource(a.plotly_js_fallback || a.plotly_js, false)
        .then((source) => loadScript(source, a.plotly_js_fallback || a.plotly_js));
      plotly = (a.plotly_js_cacheable
        ? plotlySource(a.plotly_js, true).then((source) => loadScript(source, a.plotly_js))
          .catch((error) => {
            console.warn("stream_chart: static plotly.js failed, using the component route:",
                         error);
            return viaRoute();
          })
        : viaRoute())
        .catch((error) => { plotly = null; throw error; });
    }
    return plotly;
  }

  function fail(error) {
    status.errors += 1;
    console.error("stream_chart:", error);
    chart.textContent = `Chart error: ${error && error.message ? error.message : error}`;
  }

  function setPath(target, path, value) {
    const keys = path.split(".");
    let node = target;
    for (const key of keys.slice(0, -1)) {
      if (typeof node[key] !== "object" || node[key] === null) node[key] = {};
      node = node[key];
    }
    node[keys[keys.length - 1]] = value;
  }

  function traceId(trace, index) {
    return trace.uid || trace.name || `trace ${index}`;
  }

  function themed(layout) {
    // plotly.py's template (not sent) made every axis push the margins out for its labels
    // and title; plotly.js alone would let them overlap.
    for (const name of Object.keys(layout).filter((k) => AXIS.test(k))) {
      layout[name] = Object.assign({automargin: true}, layout[name]);
    }
    if (!theme) return;
    layout.font = Object.assign({family: theme.font, color: theme.textColor}, layout.font);
    if (layout.paper_bgcolor === undefined) layout.paper_bgcolor = theme.backgroundColor;
    if (layout.plot_bgcolor === undefined) layout.plot_bgcolor = theme.backgroundColor;
    if (theme.base !== "dark") return;
    for (const name of Object.keys(layout).filter((k) => AXIS.test(k))) {
      layout[name] = Object.assign({gridcolor: "rgba(250, 250, 250, 0.12)",
                                    zerolinecolor: "rgba(250, 250, 250, 0.3)"}, layout[name]);
    }
  }

  // Slide each zoomed x axis so its right edge is the newest x; its width and every y zoom
  // stay. (An x axis the user has not zoomed autoranges, and follows by itself.)
  function follow(latest) {
    const full = chart._fullLayout || {};
    for (const name of Object.keys(view.ranges).filter((k) => k.startsWith("xaxis"))) {
      const [low, high] = view.ranges[name];
      const log = full[name] && full[name].type === "log";
      const right = log ? Math.log10(latest) : latest;
      if (Number.isFinite(right)) view.ranges[name] = [right - (high - low), right];
    }
  }

  function draw() {
    const a = args;
    if (a.revision !== view.revision) {
      view.revision = a.revision;
      view.ranges = {};
      report();
    }
    const figure = JSON.parse(a.figure);
    const data = figure.data || [];
    const layout = figure.layout || {};
    layout.height = a.height;
    layout.autosize = true;
    delete layout.width;
    themed(layout);
    for (const [path, value] of Object.entries(view.layout)) setPath(layout, path, value);
    if (a.follow && a.latest !== null && a.latest !== undefined) follow(a.latest);
    for (const [name, range] of Object.entries(view.ranges)) {
      const axis = layout[name] = layout[name] || {};
      axis.range = range.slice();
      axis.autorange = false;
      // The page's ticks fit its range, not this zoom: plotly's automatic ones (1-2-5 on
      // linear axes, decades or 1-2-5 digits on log axes) follow the zoom. "auto" explicitly:
      // left unset, an overlaying axis may sync its ticks to the other one (0.9051, 0.9217 …).
      axis.tickmode = "auto";
      delete axis.tick0;
      delete axis.dtick;
    }
    ids = data.map(traceId);
    data.forEach((trace, i) => {
      if (ids[i] in view.visible) trace.visible = view.visible[ids[i]];
    });
    return window.Plotly.react(chart, data, layout, a.config || {}).then(() => {
      status.renders += 1;
      status.latest = a.latest;
      if (!listening) {
        listening = true;
        chart.on("plotly_relayout", onRelayout);
        chart.on("plotly_restyle", onRestyle);
        chart.on("plotly_doubleclick", reset);
      }
    });
  }

  // Draw the newest figure: one Plotly.react at a time, none during a drag (a redraw would
  // cut the zoom box short), and the newest arguments only.
  function schedule() {
    if (!args || !window.Plotly) return;
    if (pressed && Date.now() - pressed < MAX_HOLD_MS) {
      held = true;
      if (!holdTimer) holdTimer = setTimeout(() => { holdTimer = null; release(); }, MAX_HOLD_MS);
      return;
    }
    if (drawing) {
      again = true;
      return;
    }
    drawing = true;
    Promise.resolve().then(draw).catch(fail).finally(() => {
      drawing = false;
      if (again) {
        again = false;
        schedule();
      }
    });
  }

  function release() {
    if (!pressed) return;
    pressed = 0;
    // After plotly's own mouseup handler has applied the zoom (and recorded it, below).
    setTimeout(() => {
      if (held) {
        held = false;
        schedule();
      }
    }, 0);
  }

  // Axes whose ranges move together (`matches`, as for the shared step axis of subplots).
  function linked(names, full) {
    const idOf = (name) => name[0] + name.slice(5);  // "xaxis2" -> "x2"
    const group = new Set(names);
    const all = Object.keys(full).filter((k) => AXIS.test(k));
    for (let grew = true; grew;) {
      grew = false;
      for (const name of all) {
        if (group.has(name)) continue;
        const partner = [...group].some((other) => full[name].matches === idOf(other)
          || (full[other] && full[other].matches === idOf(name)));
        if (partner) {
          group.add(name);
          grew = true;
        }
      }
    }
    return group;
  }

  function onRelayout(edits) {
    const touched = new Set();
    for (const [key, value] of Object.entries(edits || {})) {
      const match = AXIS_EDIT.exec(key);
      if (match) touched.add(match[1]);
      else if (!SIZE_EDITS.has(key)) view.layout[key] = value;
    }
    if (!touched.size) return;
    const full = chart._fullLayout;
    let autoscaled = false;
    for (const name of linked(touched, full)) {
      const axis = full[name];
      if (!axis) continue;
      if (axis.autorange === true) {
        delete view.ranges[name];
        autoscaled = true;
      } else {
        view.ranges[name] = axis.range.slice();
      }
    }
    report();
    if (autoscaled) schedule();  // the page's own range for it, not plotly's fit-everything
  }

  function onRestyle(event) {
    const edits = event && event[0];
    if (!edits || !("visible" in edits)) return;
    (chart.data || []).forEach((trace, i) => {
      view.visible[ids[i] || traceId(trace, i)] = trace.visible === undefined ? true
        : trace.visible;
    });
  }

  // Double-click: back to the page's view (its ranges, or autorange); hidden traces stay.
  function reset() {
    view.ranges = {};
    report();
    schedule();
  }

  // The x range the user chose, in data units, as the component's value (sent on change).
  function report() {
    const full = chart._fullLayout || {};
    const range = view.ranges.xaxis;
    let value = null;
    if (range) {
      value = full.xaxis && full.xaxis.type === "log" ? range.map((v) => 10 ** v) : range.slice();
    }
    const text = JSON.stringify(value);
    if (text === sent) return;
    const first = sent === undefined;
    sent = text;
    if (!first || value !== null) {
      post("streamlit:setComponentValue", {value: {x_range: value}, dataType: "json"});
    }
  }

  function sameArgs(a, b) {
    return ["figure", "height", "follow", "latest", "revision"].every((k) => a[k] === b[k])
      && JSON.stringify(a.config) === JSON.stringify(b.config);
  }

  chart.addEventListener("pointerdown", () => { pressed = Date.now(); }, true);
  window.addEventListener("pointerup", release, true);
  window.addEventListener("pointercancel", release, true);

  window.addEventListener("message", (event) => {
    const message = event.data;
    if (event.source !== window.parent || !message || message.type !== "streamlit:render") {
      return;
    }
    // A refresh whose data did not change sends the same arguments again: nothing to draw.
    const same = args && theme && sameArgs(args, message.args)
      && JSON.stringify(theme) === JSON.stringify(message.theme);
    args = message.args;
    theme = message.theme;
    if (args.height !== frameHeight) {  // at once, so the page does not jump when plotly lands
      frameHeight = args.height;
      post("streamlit:setFrameHeight", {height: frameHeight});
    }
    if (!same) loadPlotly(args).then(schedule, fail);
  });
  post("streamlit:componentReady", {apiVersion: 1});
})();
