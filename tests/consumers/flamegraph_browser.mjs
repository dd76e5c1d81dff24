// Opens a flame graph SVG in headless Chromium, plays a list of user actions and
// prints, as one JSON array, what the page shows after each:
//   [{"dialogs": [prompt messages], "unzoom": visible?, "search": label,
//     "ignorecase": class, "matched": text,
//     "frames": [[name, x, width, fill, visible], ...]}, ...]
// The first entry is the page as loaded.  Actions (a JSON array, argv[4]):
//   {"click": "#id"}            click a control
//   {"clickFrame": N}           click the Nth frame in document order
//   {"press": "Control+f"}      press keys
//   "answer" on any action:     what to type into a prompt the action opens
//
// usage: node flamegraph_browser.mjs NODE_MODULES/playwright-core CHROMIUM SVG ACTIONS
import path from 'node:path'
import {createRequire} from 'node:module'
import {pathToFileURL} from 'node:url'

const [playwrightDir, chromiumPath, svg, actionsJson] = process.argv.slice(2)
const {chromium} = createRequire(import.meta.url)(path.resolve(playwrightDir))
const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
})
try {
  const page = await browser.newPage()
  page.setDefaultTimeout(10000)
  const errors = []
  page.on('pageerror', error => errors.push(String(error)))
  let answer = null
  let dialogs = []
  page.on('dialog', async dialog => {
    dialogs.push(dialog.message())
    if (answer === null) await dialog.dismiss()
    else await dialog.accept(answer)
  })
  await page.goto(pathToFileURL(path.resolve(svg)).href)

  const snapshot = async () => {
    const state = await page.evaluate(() => {
      const text = id => document.getElementById(id)
      return {
        unzoom: getComputedStyle(text('unzoom')).display !== 'none',
        search: text('search').firstChild.nodeValue,
        ignorecase: text('ignorecase').getAttribute('class') || '',
        matched: text('matched').textContent,
        frames: Array.from(document.querySelectorAll('g.f'), g => {
          const title = g.querySelector('title').textContent
          const rect = g.querySelector('rect')
          return [title.slice(0, title.lastIndexOf(' (')), +rect.getAttribute('x'),
                  +rect.getAttribute('width'), rect.getAttribute('fill'),
                  g.style.display !== 'none']
        }),
      }
    })
    state.dialogs = dialogs
    dialogs = []
    return state
  }

  const states = [await snapshot()]
  for (const action of JSON.parse(actionsJson)) {
    answer = action.answer ?? null
    if (action.click) await page.click(action.click)
    if (action.clickFrame !== undefined) {
      await page.locator('g.f').nth(action.clickFrame).locator('rect').click()
    }
    if (action.press) await page.keyboard.press(action.press)
    states.push(await snapshot())
  }
  if (errors.length) throw new Error(`the page's script failed: ${errors.join('; ')}`)
  process.stdout.write(JSON.stringify(states) + '\n')
} finally {
  await browser.close()
}
