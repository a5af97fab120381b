/* Panda's token keeper: the dashboard's access token in this tab's sessionStorage.
 *
 * Speaks Streamlit's custom-component protocol (v1) directly (see stream_chart.js):
 *   from the page  {type: "streamlit:render", args: {remember, forget}}
 *   to the page    {isStreamlitMessage: true, type: "streamlit:setComponentValue", value}
 *
 * sessionStorage belongs to one tab and one origin, survives a reload of that tab, and is
 * gone when the tab closes. The token never goes into a URL and is never logged here.
 */
"use strict";

(function () {
  const KEY = "panda-access-token";
  let offered = false;  // the stored token goes to the page once per page load

  function post(type, extra) {
    window.parent.postMessage(Object.assign({isStreamlitMessage: true, type}, extra), "*");
  }

  function stored() {
    try {
      return window.sessionStorage.getItem(KEY);
    } catch (error) {  // storage disabled: the token has to be typed after each reload
      return null;
    }
  }

  window.addEventListener("message", (event) => {
    const message = event.data;
    if (event.source !== window.parent || !message || message.type !== "streamlit:render") {
      return;
    }
    const args = message.args || {};
    try {
      if (args.forget) window.sessionStorage.removeItem(KEY);
      if (args.remember) window.sessionStorage.setItem(KEY, args.remember);
    } catch (error) {
      // storage disabled: nothing to keep
    }
    post("streamlit:setFrameHeight", {height: 0});
    if (!offered) {
      offered = true;
      const token = stored();
      if (token && !args.remember) {
        // `offer` tells this page load's offer from one the page has already checked.
        const offer = `${Date.now()}-${Math.random()}`;
        post("streamlit:setComponentValue", {value: {token, offer}, dataType: "json"});
      }
    }
  });
  post("streamlit:componentReady", {apiVersion: 1});
})();
