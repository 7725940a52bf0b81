/* thumbclf's docs: a Worker stand-in for pages opened from the disk (file://).
 *
 * A browser refuses to start a web worker from a file:// page, and the search of
 * mkdocs-material runs in one. Opened from the disk, this replaces Worker by a hidden
 * same-origin iframe that runs the worker's script: messages go in as "message" events on the
 * iframe's window, and the script's postMessage comes back as "message" events here. Served
 * over http(s), it changes nothing. Named iframe-worker so that the offline plugin does not
 * add its own shim from a CDN (mkdocs.yml, extra.polyfills), which would need the network.
 */
(function () {
  "use strict";
  if (location.protocol !== "file:") return;

  class FrameWorker extends EventTarget {
    constructor(url) {
      super();
      this.onmessage = null;
      this.queue = [];
      this.frame = document.createElement("iframe");
      this.frame.hidden = true;
      this.frame.setAttribute("aria-hidden", "true");
      (document.body || document.documentElement).appendChild(this.frame);
      const scope = this.frame.contentWindow;
      scope.postMessage = (data) => this.receive(data);  // the script's replies
      scope.importScripts = () => {
        throw new Error("importScripts is not available in a page opened from the disk");
      };
      const script = scope.document.createElement("script");
      script.src = new URL(url, location.href).href;
      script.onload = () => {
        const waiting = this.queue;
        this.queue = null;
        waiting.forEach((data) => this.postMessage(data));
      };
      scope.document.head.appendChild(script);
    }

    postMessage(data) {
      if (this.queue) {
        this.queue.push(data);
        return;
      }
      const scope = this.frame.contentWindow;
      scope.dispatchEvent(new scope.MessageEvent("message", { data: data }));
    }

    receive(data) {
      setTimeout(() => {
        const event = new MessageEvent("message", { data: data });
        if (typeof this.onmessage === "function") this.onmessage(event);
        this.dispatchEvent(event);
      });
    }

    terminate() {
      this.frame.remove();
    }
  }

  window.Worker = FrameWorker;
})();
