// Reads a file with speedscope's own importer, the code its app runs when a
// user opens the file, and prints what it read as one JSON object:
//   {"warnings": [...], "name": ..., "profiles": [{"name", "unit", "totalWeight",
//    "calls": [[depth, frame name, start, end], ...]}]}
// "calls" are the boxes of the Time Order view, in the order the view draws them.
//
// usage: node speedscope_import.mjs NODE_MODULES/speedscope FILE
import fs from 'node:fs'
import path from 'node:path'
import vm from 'node:vm'

const [packageDir, file] = process.argv.slice(2)
const release = path.join(packageDir, 'dist', 'release')
const bundle = fs.readdirSync(release).find(name => /^speedscope-\w+\.js$/.test(name))
let source = fs.readFileSync(path.join(release, bundle), 'utf8')

// The app loads its importers into one promise, `X=Promise.resolve().then(() => (init(),
// module))`; hand that promise out.  The rest of the app then stops for want of a DOM,
// which the importers do not need.
const lazy = /var (\w+)=Promise\.resolve\(\)\.then\(\(\)=>\(\w+\(\),\w+\)\);/.exec(source)
if (!lazy) throw new Error(`no importer module found in ${bundle}`)
source = source.replace(lazy[0], `${lazy[0]}globalThis.speedscopeImporters=${lazy[1]};`)

const warnings = []
// stdout is for the result alone; what the importer logs goes to stderr.
console.log = (...args) => process.stderr.write(args.map(String).join(' ') + '\n')
globalThis.window = globalThis
globalThis.location = {hash: '', search: '', protocol: 'file:', href: 'file:///'}
try {
  vm.runInThisContext(source, {filename: bundle})
} catch (error) {
  if (!(error instanceof ReferenceError && /document/.test(error.message))) throw error
}
const importers = await globalThis.speedscopeImporters
console.warn = (...args) => warnings.push(args.map(String).join(' '))
console.error = console.warn
const group = await importers.importProfileGroupFromText(path.basename(file),
                                                         fs.readFileSync(file, 'utf8'))
if (!group) throw new Error(`speedscope could not read ${file}`)

const profiles = group.profiles.map(profile => {
  const calls = []
  const open = []
  profile.forEachCall(
    (node, value) => { open.push(calls.length); calls.push([open.length - 1, node.frame.name, value, null]) },
    (node, value) => { calls[open.pop()][3] = value })
  return {name: profile.getName(), unit: profile.getWeightUnit(),
          totalWeight: profile.getTotalWeight(), calls}
})
process.stdout.write(JSON.stringify({warnings, name: group.name, profiles}) + '\n')
