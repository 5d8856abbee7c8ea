// Small line charts on <canvas>: no dependency. draw(points, series) redraws the whole chart.

const PAD = { left: 40, right: 8, top: 8, bottom: 18 };

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// A gridline's value: quarters of a 1/2/2.5/5 scale, written whole (0.625, 37.5, 1.25k), where
// one decimal read 0.25 as 0.3 and 37.5 as 38.
export function axisLabel(v) {
  if (v >= 1000) return `${+(v / 1000).toPrecision(4)}k`;
  return String(+v.toPrecision(4));
}

export class LineChart {
  constructor(canvas, series) {
    this.canvas = canvas;
    this.series = series; // [{key, label, color}]
  }

  draw(points) {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || c.width, h = c.clientHeight || c.height;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const pw = w - PAD.left - PAD.right, ph = h - PAD.top - PAD.bottom;
    let max = 0;
    for (const p of points) for (const s of this.series) {
      const v = p[s.key];
      if (typeof v === "number" && v > max) max = v;
    }
    max = niceMax(max);
    g.strokeStyle = "#263241";
    g.fillStyle = "#7d8a99";
    g.font = "10px system-ui, sans-serif";
    g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = PAD.top + ph - (ph * i) / 4;
      g.beginPath(); g.moveTo(PAD.left, y); g.lineTo(PAD.left + pw, y); g.stroke();
      g.fillText(axisLabel((max * i) / 4), 4, y + 3);
    }
    const n = points.length;
    if (n > 1) {
      g.fillText(`${Math.round(n / 60 * 10) / 10} min`, PAD.left, h - 4);
      g.fillText("now", PAD.left + pw - 20, h - 4);
    }
    const x = (i) => PAD.left + (n <= 1 ? pw : (pw * i) / (n - 1));
    const y = (v) => PAD.top + ph - (ph * v) / max;
    let lx = PAD.left + 60;
    for (const s of this.series) {
      g.strokeStyle = s.color;
      g.lineWidth = 1.5;
      g.beginPath();
      let pen = false;
      points.forEach((p, i) => {
        const v = p[s.key];
        if (typeof v !== "number") { pen = false; return; }
        if (pen) g.lineTo(x(i), y(v)); else g.moveTo(x(i), y(v));
        pen = true;
      });
      g.stroke();
      g.fillStyle = s.color;
      g.fillRect(lx, h - 10, 8, 3);
      g.fillText(s.label, lx + 11, h - 6);
      lx += 16 + g.measureText(s.label).width + 8;
    }
    if (n === 0) {
      g.fillStyle = "#7d8a99";
      g.fillText("collecting…", PAD.left + pw / 2 - 25, PAD.top + ph / 2);
    }
  }
}
