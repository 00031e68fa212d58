// Models by name, end to end: a generated model placed in an Ollama store, a
// Hugging Face cache and an LM Studio folder (temporary directories), used
// by name from `kvbatch run` and `kvbatch serve`, and listed by `kvbatch models`.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import {
  KVBATCH_BIN, childEnv, makeWorkDir, removeDir, startServer, stopServer, makeInputFile, chatRows, parseJsonl,
} from './helpers.mjs';

const execFileP = promisify(execFile);
let work;
let env;

function place(file, text) {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  if (text === undefined) fs.copyFileSync(work.model, file);
  else fs.writeFileSync(file, text);
}

// A GGUF header llama.cpp cannot load: an architecture and nothing else.
function headerOnlyGguf(arch) {
  const str = (s) => {
    const b = Buffer.from(s);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(b.length));
    return Buffer.concat([len, b]);
  };
  const head = Buffer.alloc(24);
  head.write('GGUF', 0);
  head.writeUInt32LE(3, 4);
  head.writeBigUInt64LE(0n, 8);  // tensors
  head.writeBigUInt64LE(1n, 16);  // keys
  const type = Buffer.alloc(4);
  type.writeUInt32LE(8, 0);  // string
  return Buffer.concat([head, str('general.architecture'), type, str(arch)]);
}

before(async () => {
  work = await makeWorkDir('kvbatch-models-');
  const ollama = path.join(work.dir, 'ollama');
  const manifest = (hex) => JSON.stringify({
    schemaVersion: 2,
    layers: [{ mediaType: 'application/vnd.ollama.image.model', digest: `sha256:${hex}`, size: 1 }],
  });
  place(path.join(ollama, 'manifests', 'example.org', 'library', 'tiny', '1b'), manifest('ab12'));
  place(path.join(ollama, 'blobs', 'sha256-ab12'));
  place(path.join(ollama, 'manifests', 'example.org', 'library', 'broken', 'latest'), manifest('cd34'));
  place(path.join(ollama, 'blobs', 'sha256-cd34'), headerOnlyGguf('gemma3'));
  const hf = path.join(work.dir, 'hf');
  place(path.join(hf, 'models--Org--Tiny-GGUF', 'refs', 'main'), 'rev1\n');
  place(path.join(hf, 'models--Org--Tiny-GGUF', 'snapshots', 'rev1', 'tiny-Q8_0.gguf'));
  place(path.join(work.dir, 'lmstudio', 'pub', 'tiny', 'tiny-Q8_0.gguf'));
  env = {
    ...childEnv(), OLLAMA_MODELS: ollama, HF_HUB_CACHE: hf, LLAMA_CACHE: path.join(work.dir, 'none'),
    LMSTUDIO_MODELS: path.join(work.dir, 'lmstudio'), HOME: work.dir,
  };
});

after(() => removeDir(work && work.dir));

async function run(model, name) {
  const input = makeInputFile(work.dir, `${name}.jsonl`, chatRows(3, { body: { max_tokens: 4 } }));
  const out = path.join(work.dir, `${name}-out.jsonl`);
  await execFileP(KVBATCH_BIN, ['run', input, '-o', out, '-m', model, '-q', '--threads', '1'], { env });
  return parseJsonl(fs.readFileSync(out, 'utf8'));
}

test('kvbatch run takes Ollama, Hugging Face and LM Studio names, and answers under that name', async () => {
  for (const [model, name] of [['ollama:tiny:1b', 'o1'], ['tiny:1b', 'o2'], ['hf:Org/Tiny-GGUF:Q8_0', 'h1'],
    ['hf:Org/Tiny-GGUF', 'h2'], ['lmstudio:pub/tiny', 'l1']]) {
    const lines = await run(model, name);
    assert.equal(lines.length, 3, model);
    for (const l of lines) {
      assert.equal(l.response.status_code, 200, model);
      assert.equal(l.response.body.model, model);
    }
  }
});

test('an unknown name says where it looked; a blob llama.cpp cannot load names the remedy', async () => {
  const input = makeInputFile(work.dir, 'x.jsonl', chatRows(1));
  const fail = async (model) => {
    const r = await execFileP(KVBATCH_BIN, ['run', input, '-o', path.join(work.dir, 'x-out.jsonl'), '-m', model],
      { env }).then(() => null, (e) => e);
    assert.ok(r, `${model} should fail`);
    assert.equal(r.code, 1);
    return r.stderr;
  };
  assert.match(await fail('ollama:tiny:70b'), /no Ollama model 'tiny:70b'.*OLLAMA_MODELS/);
  assert.match(await fail('hf:Org/Missing'), /not in a local cache.*never uses the network/);
  assert.match(await fail('no-such-file.gguf'), /model not found: no-such-file\.gguf/);
  const broken = await fail('ollama:broken');
  assert.match(broken, /Ollama's blob/);
  assert.match(broken, /Remedy/);
});

test('kvbatch serve lists a model by the name it was given', async () => {
  const server = await startServer({ model: 'hf:Org/Tiny-GGUF:Q8_0', dataDir: path.join(work.dir, 'serve'), env });
  try {
    const models = await server.client().models.list();
    assert.deepEqual(models.data.map((m) => m.id), ['hf:Org/Tiny-GGUF:Q8_0']);
  } finally {
    await stopServer(server);
  }
});

test('kvbatch models lists every store with architecture, quantisation, context and size', async () => {
  const { stdout } = await execFileP(KVBATCH_BIN, ['models', '--json'], { env });
  const list = JSON.parse(stdout);
  const byName = Object.fromEntries(list.map((m) => [m.name, m]));
  for (const name of ['ollama:tiny:1b', 'hf:Org/Tiny-GGUF', 'lmstudio:pub/tiny']) {
    const m = byName[name];
    assert.ok(m, `${name} listed: ${JSON.stringify(list.map((x) => x.name))}`);
    assert.equal(m.architecture, 'llama');
    assert.equal(m.quantization, 'Q8_0');
    assert.ok(m.context_length > 0);
    assert.equal(m.bytes, fs.statSync(work.model).size);
  }
  assert.equal(byName['ollama:broken:latest'].architecture, 'gemma3');
  const text = await execFileP(KVBATCH_BIN, ['models'], { env });
  assert.match(text.stdout, /^NAME\s+ARCH\s+QUANT\s+CONTEXT\s+SIZE\s+PATH/m);
  assert.match(text.stdout, /ollama:tiny:1b\s+llama\s+Q8_0/);
});

test('gen-model --chat-template stores the template, and requests are rendered by it', async () => {
  const template = path.join(work.dir, 'plain.jinja');
  fs.writeFileSync(template,
    "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<<assistant>> {% endif %}");
  const model = path.join(work.dir, 'templated.gguf');
  await execFileP(KVBATCH_BIN, ['gen-model', '--preset', 'tiny', '-o', model, '--chat-template', template], { env });
  assert.ok(fs.readFileSync(model).includes('<<assistant>> '));
  const plain = await run(work.model, 'chatml');
  const templated = await run(model, 'templated');
  // The same messages: a different template, a different prompt length.
  assert.notEqual(templated[0].response.body.usage.prompt_tokens, plain[0].response.body.usage.prompt_tokens);
  const bad = await execFileP(KVBATCH_BIN, ['gen-model', '-o', model, '--chat-template', path.join(work.dir, 'nope')],
    { env }).then(() => null, (e) => e);
  assert.ok(bad && bad.code !== 0);
});
