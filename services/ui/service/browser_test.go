package service

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
)

// chromiumPath is Debian's Chromium (package chromium), which .ci/run
// installs. The machine has no network: the flags below keep Chromium from
// trying to reach Google's services at every start.
const chromiumPath = "/usr/bin/chromium"

// page is one browser tab on the ui.
type page struct {
	t   *testing.T
	ctx context.Context
}

// openBrowser starts a headless Chromium with a fresh profile for t. A
// missing Chromium fails the test: the browser tests never skip.
func openBrowser(t *testing.T) *page {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		t.Fatalf("the browser tests need Debian's Chromium at %s (apt-get install -y chromium; .ci/run installs it): %v", chromiumPath, err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox, // CI runs as root
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(allocCtx)
	// The first action starts the browser and must run without a deadline
	// (a deadline on it would stop the browser when it passes).
	if err := chromedp.Do(ctx); err != nil {
		cancel()
		cancelAlloc()
		t.Fatalf("start Chromium (%s): %v", chromiumPath, err)
	}
	t.Cleanup(func() {
		_ = chromedp.Cancel(ctx) // closes the browser and waits for it
		cancel()
		cancelAlloc()
	})
	return &page{t: t, ctx: ctx}
}

// do runs actions within waitFor.
func (p *page) do(what string, actions ...chromedp.Action[chromedp.Void]) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, waitFor)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		p.t.Fatalf("%s: %v", what, err)
	}
}

// eval evaluates a JavaScript expression.
func eval[T any](p *page, expr string) T {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, waitFor)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		p.t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// waitJS waits until a JavaScript expression is truthy.
func (p *page) waitJS(what, expr string) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, waitFor+5*time.Second)
	defer cancel()
	_, err := chromedp.Run(ctx, chromedp.Poll[any](expr, chromedp.WithPollingTimeout(waitFor), chromedp.WithPollingInterval(25*time.Millisecond)))
	if err != nil {
		p.t.Fatalf("waiting for %s (%s): %v\nconnection: %s\nrows: %s", what, expr, err,
			p.quiet(`document.getElementById('connection').dataset.state`), p.quiet(`document.querySelector('#products tbody').innerText`))
	}
}

// quiet evaluates for a failure message.
func (p *page) quiet(expr string) string {
	ctx, cancel := context.WithTimeout(p.ctx, 5*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[string](`String(`+expr+`)`))
	if err != nil {
		return err.Error()
	}
	return v
}

func (p *page) open(url string) {
	p.t.Helper()
	p.do("open "+url, chromedp.Navigate(url))
	p.waitJS("the page is live", `document.getElementById('connection').dataset.state === 'live'`)
}

func rowSel(id string) string { return fmt.Sprintf(`tr[data-id=%q]`, id) }

func (p *page) cell(id, class string) string {
	p.t.Helper()
	return eval[string](p, fmt.Sprintf(`document.querySelector(%q).querySelector('.%s').innerText.trim()`, rowSel(id), class))
}

// The article's demo in a real browser: the page shows a product created
// through the API and its changes without a reload, and a reload shows the
// same state.
func TestBrowserShowsChangesLive(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	u := e.startUI()
	p := openBrowser(t)
	p.open(u.base + "/")
	if got := p.quiet(`document.getElementById('empty').hidden`); got != "false" {
		t.Fatalf("an empty model does not say so: hidden=%s", got)
	}
	// A mark that only survives as long as the page is not reloaded.
	p.do("mark the page", chromedp.Evaluate[chromedp.Void](`window.__sameDocument = 'yes'`))
	sameDocument := func() string { return p.quiet(`window.__sameDocument`) }

	candy := e.create("candy", 100, 0)
	p.waitJS("candy appears", fmt.Sprintf(`document.querySelector(%q)`, rowSel(candy.ID)))
	if got := p.cell(candy.ID, "name"); got != "candy" {
		t.Fatalf("name cell %q", got)
	}
	if got := p.cell(candy.ID, "price"); got != "$1.00" {
		t.Fatalf("price cell %q, want $1.00 (cents formatted)", got)
	}
	if got := p.cell(candy.ID, "state"); !strings.Contains(got, "created") {
		t.Fatalf("state cell %q", got)
	}
	if sameDocument() != "yes" {
		t.Fatal("the page reloaded to show the new product")
	}

	e.adjust(candy.ID, 5)
	p.waitJS("candy is in stock", fmt.Sprintf(`document.querySelector(%q + '[data-state="in_stock"]')`, rowSel(candy.ID)))
	if got, state := p.cell(candy.ID, "inventory"), p.cell(candy.ID, "state"); got != "5" || !strings.Contains(state, "in stock") {
		t.Fatalf("after +5: inventory %q, state %q", got, state)
	}
	if sameDocument() != "yes" {
		t.Fatal("the page reloaded to show the change")
	}
	p.waitJS("the diagram counts it", `document.querySelector('#machine g.state[data-state="in_stock"] text.count').textContent === '1 product'`)

	// Its history, on demand.
	p.do("open the history", chromedp.Click(chromedp.CSS(rowSel(candy.ID)+" button.history-button")))
	p.waitJS("the history shows both transitions", `document.getElementById('history').open && document.querySelectorAll('#history-body tbody tr').length === 2`)
	if got := p.quiet(`document.getElementById('history-title').textContent`); got != "History of candy" {
		t.Fatalf("history title %q", got)
	}
	if got := p.quiet(`[...document.querySelectorAll('#history-body tbody th')].map(th => th.textContent).join(',')`); got != "create,add inventory" {
		t.Fatalf("history events %q", got)
	}
	p.waitJS("the diagram marks candy's state", `document.querySelector('#machine g.state.current').dataset.state === 'in_stock'`)
	p.do("close the history", chromedp.Click(chromedp.CSS("#history-close")))
	p.waitJS("the history closed", `!document.getElementById('history').open`)

	// A second product, and a discontinued one, for the picture.
	tea := e.create("Green tea", 350, 12)
	chips := e.create("Salted chips", 199, 0)
	e.discontinue(chips.ID)
	p.waitJS("all three shown", fmt.Sprintf(`document.querySelector(%q + '[data-state="discontinued"]') && document.querySelector(%q)`,
		rowSel(chips.ID), rowSel(tea.ID)))
	if got := p.quiet(`[...document.querySelectorAll('#products tbody th')].map(th => th.textContent).join(',')`); got != "candy,Green tea,Salted chips" {
		t.Fatalf("rows in order %q", got)
	}
	screenshot(t, p)

	p.do("reload", chromedp.Reload())
	p.waitJS("the page is live again", `document.getElementById('connection').dataset.state === 'live'`)
	if sameDocument() == "yes" {
		t.Fatal("the page did not reload")
	}
	p.waitJS("candy is still there, in stock", fmt.Sprintf(`document.querySelector(%q + '[data-state="in_stock"]')`, rowSel(candy.ID)))
	if got := p.cell(candy.ID, "inventory"); got != "5" {
		t.Fatalf("after the reload: inventory %q", got)
	}
	if got := p.quiet(`document.querySelectorAll('#products tbody tr').length`); got != "3" {
		t.Fatalf("after the reload: %s rows, want 3", got)
	}
}

// screenshot saves the page as a PNG: to $UI_SCREENSHOT when set (to look
// at it), else to the test's temporary folder.
func screenshot(t *testing.T, p *page) {
	t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, waitFor)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if !bytes.HasPrefix(png, []byte("\x89PNG")) {
		t.Fatal("the screenshot is not a PNG")
	}
	path := os.Getenv("UI_SCREENSHOT")
	if path == "" {
		path = t.TempDir() + "/page.png"
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}

// a11yCheck returns the accessibility problems of the page: names, labels,
// headings, landmarks, table headers, states as words and shapes (not
// colour alone), the live connection indicator, and text contrast.
const a11yCheck = `(() => {
  const problems = [];
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const text = (el) => (el.textContent || '').replace(/\s+/g, ' ').trim();
  const nameOf = (el) => {
    const by = el.getAttribute('aria-labelledby');
    if (by) return by.split(/\s+/).map((id) => text(document.getElementById(id) || document.createElement('i'))).join(' ').trim();
    const label = el.getAttribute('aria-label');
    if (label) return label.trim();
    if (el.labels && el.labels.length) return [...el.labels].map(text).join(' ');
    return text(el) || (el.getAttribute('title') || '').trim() || (el.getAttribute('alt') || '').trim();
  };
  if (!document.documentElement.lang) problems.push('html has no lang');
  if (!document.title.trim()) problems.push('the page has no title');
  const h1 = document.querySelectorAll('h1');
  if (h1.length !== 1) problems.push(h1.length + ' h1 elements');
  let prev = 0;
  for (const h of document.querySelectorAll('h1, h2, h3, h4, h5, h6')) {
    const level = +h.tagName[1];
    if (prev && level > prev + 1) problems.push('heading "' + text(h) + '" skips from h' + prev + ' to h' + level);
    prev = level;
  }
  for (const [sel, role] of [['body > header', 'banner'], ['main', 'main'], ['body > footer', 'contentinfo']]) {
    if (!document.querySelector(sel)) problems.push('no ' + role + ' landmark');
  }
  for (const el of document.querySelectorAll('a[href], button, input, select, textarea, [tabindex]:not([tabindex="-1"])')) {
    if (!nameOf(el)) problems.push(el.outerHTML.slice(0, 80) + ' has no accessible name');
  }
  for (const b of document.querySelectorAll('button')) {
    if (b.getAttribute('type') !== 'button') problems.push('button "' + text(b) + '" has no type=button');
    if (text(b) && !nameOf(b).includes(text(b))) problems.push('button "' + text(b) + '" is named "' + nameOf(b) + '"');
  }
  for (const t of document.querySelectorAll('table')) {
    if (!t.caption || !text(t.caption)) problems.push('a table has no caption');
    for (const th of t.querySelectorAll('thead th')) if (th.getAttribute('scope') !== 'col') problems.push('column header "' + text(th) + '" has no scope');
    for (const tr of t.querySelectorAll('tbody tr')) {
      const th = tr.querySelector('th');
      if (!th || th.getAttribute('scope') !== 'row') problems.push('a row has no row header');
    }
  }
  const labels = { created: 'created', in_stock: 'in stock', out_of_stock: 'out of stock', discontinued: 'discontinued' };
  const icons = {};
  for (const b of document.querySelectorAll('.badge')) {
    const icon = b.querySelector('.badge-icon');
    const words = text(b).replace(icon ? text(icon) : '', '').trim();
    if (words !== labels[b.dataset.state]) problems.push('state ' + b.dataset.state + ' reads "' + words + '"');
    if (!icon || icon.getAttribute('aria-hidden') !== 'true' || !text(icon)) problems.push('state ' + b.dataset.state + ' has no shape');
    else icons[b.dataset.state] = text(icon);
  }
  if (new Set(Object.values(icons)).size !== Object.keys(icons).length) problems.push('two states share a shape: ' + JSON.stringify(icons));
  if (document.querySelectorAll('.badge').length === 0) problems.push('no state badges to check');
  const conn = document.getElementById('connection');
  if (!conn || conn.getAttribute('role') !== 'status' || conn.getAttribute('aria-live') !== 'polite' || !text(conn.querySelector('.connection-text'))) problems.push('the connection indicator is not a live status with words');
  const svg = document.querySelector('#machine svg');
  if (!svg || svg.getAttribute('role') !== 'img' || !nameOf(svg)) problems.push('the diagram has no accessible name');
  const dlg = document.getElementById('history');
  if (!dlg || !nameOf(dlg)) problems.push('the history dialog has no name');

  // Contrast (WCAG AA) of visible text against the first opaque background.
  const rgb = (s) => { const m = s.match(/[\d.]+/g).map(Number); return { r: m[0], g: m[1], b: m[2], a: m.length > 3 ? m[3] : 1 }; };
  const lum = (c) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }; return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.a === 1) return c;
    }
    return { r: 255, g: 255, b: 255, a: 1 };
  };
  const seen = new Set();
  for (const el of document.querySelectorAll('h1, h2, p, th, td, .badge, .button, .connection-text, code, .brand-name, time, caption')) {
    if (!visible(el) || !text(el) || el.closest('.visually-hidden')) continue;
    const cs = getComputedStyle(el);
    const ratio = ((a, b) => (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05))(lum(rgb(cs.color)), lum(background(el)));
    const size = parseFloat(cs.fontSize);
    const large = size >= 24 || (+cs.fontWeight >= 700 && size >= 18.66);
    const min = large ? 3 : 4.5;
    const key = el.tagName + '.' + el.className;
    if (ratio < min && !seen.has(key)) {
      seen.add(key);
      problems.push(key + ' "' + text(el).slice(0, 30) + '": contrast ' + ratio.toFixed(2) + ' < ' + min);
    }
  }
  return problems;
})()`

// describeFocus names the focused element and whether focus is visible.
const describeFocus = `(() => {
  const el = document.activeElement;
  const cs = getComputedStyle(el);
  const outlined = cs.outlineStyle !== 'none' && parseFloat(cs.outlineWidth) > 0;
  const r = el.getBoundingClientRect();
  const id = el.dataset.id ? '#' + el.dataset.id : '';
  return el.tagName.toLowerCase() + id + '|' + (el.getAttribute('aria-label') || el.textContent.trim()) + '|' + (outlined ? 'visible' : 'invisible') + '|' + (r.width > 0 && r.height > 0 ? 'shown' : 'hidden');
})()`

// The page passes a basic accessibility check, and every control is
// reachable and usable from the keyboard.
func TestBrowserAccessibility(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a := e.create("apple", 120, 4)
	b := e.create("biscuits", 300, 0)
	c := e.create("cocoa", 450, 1)
	e.adjust(c.ID, -1)
	d := e.create("dates", 800, 2)
	e.discontinue(d.ID)
	u := e.startUI()
	p := openBrowser(t)
	p.open(u.base + "/")
	p.waitJS("four rows and the diagram", `document.querySelectorAll('#products tbody tr').length === 4 && document.querySelector('#machine svg')`)

	problems := eval[[]string](p, a11yCheck)
	if len(problems) > 0 {
		t.Errorf("accessibility problems:\n  %s", strings.Join(problems, "\n  "))
	}
	// The check can fail: a badge reduced to its colour is caught.
	p.do("strip a badge's words", chromedp.Evaluate[chromedp.Void](`(() => { const b = document.querySelector('.badge'); b.lastChild.textContent = ''; })()`))
	if got := eval[[]string](p, a11yCheck); len(got) == 0 {
		t.Error("the check passes a state badge without words")
	}
	p.do("reload", chromedp.Reload())
	p.waitJS("live again", `document.getElementById('connection').dataset.state === 'live' && document.querySelectorAll('#products tbody tr').length === 4`)

	// Tab through the page: the skip link, then one History button per
	// product, each with a visible focus ring.
	var stops []string
	for range 12 {
		p.do("tab", chromedp.KeyEvent(kb.Tab))
		stops = append(stops, eval[string](p, describeFocus))
	}
	reached := map[string]bool{}
	for _, s := range stops {
		parts := strings.Split(s, "|")
		if parts[0] == "body" {
			continue
		}
		if parts[2] != "visible" || parts[3] != "shown" {
			t.Errorf("focus on %s is %s and %s", parts[0]+" "+parts[1], parts[2], parts[3])
		}
		reached[parts[0]+"|"+parts[1]] = true
	}
	want := []string{"a|Skip to the products"}
	for _, pr := range []product{a, b, c, d} {
		want = append(want, "button#"+pr.ID+"|History of "+pr.Name)
	}
	for _, w := range want {
		if !reached[w] {
			t.Errorf("Tab never reaches %s; it stops at:\n  %s", w, strings.Join(stops, "\n  "))
		}
	}

	// Enter opens a history, Escape closes it and gives the focus back.
	p.do("focus cocoa's History button", chromedp.Focus(chromedp.CSS(rowSel(c.ID)+" button")))
	p.do("press Enter", chromedp.KeyEvent(kb.Enter))
	p.waitJS("the dialog is open, with the focus in it", `document.getElementById('history').open && document.getElementById('history').contains(document.activeElement) && document.querySelectorAll('#history-body tbody tr').length === 3`)
	problems = eval[[]string](p, a11yCheck)
	if len(problems) > 0 {
		t.Errorf("accessibility problems with the dialog open:\n  %s", strings.Join(problems, "\n  "))
	}
	p.do("press Escape", chromedp.KeyEvent(kb.Escape))
	p.waitJS("the dialog is closed and the focus back", fmt.Sprintf(`!document.getElementById('history').open && document.activeElement === document.querySelector(%q)`, rowSel(c.ID)+" button"))
}
