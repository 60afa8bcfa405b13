// Writes Fixtures/arrow_lerobot: a one-episode LeRobot v2.1 dataset whose parquet file comes from the Arrow ecosystem
// (arrow-rs through parquet-wasm), not from Parquet.Net: nullable columns, a FixedSizeList action (what Hugging Face
// datasets writes for Sequence(float32, length=7)), an image struct {bytes, path}, Snappy pages and 3-row row groups.
// The test LeRobotReaderTests.Reads_a_parquet_file_written_by_arrow checks our reader against it.
//
// Regenerate: npm install parquet-wasm@0.8.0 apache-arrow@21.2.0; put png/0.png..png/3.png beside this script (6x4 RGB,
// byte i of frame t = (50·t + i) mod 256, e.g. from OpenVLA.FineTune.Data.ImageCodec.EncodePng); node make_arrow_lerobot.mjs
import * as arrow from 'apache-arrow';
import * as pq from 'parquet-wasm/node';
import fs from 'fs';
const T = 4;
const root = new URL('./arrow_lerobot', import.meta.url).pathname;
fs.mkdirSync(root + '/data/chunk-000', { recursive: true });
fs.mkdirSync(root + '/meta', { recursive: true });
const img = new arrow.Struct([new arrow.Field('bytes', new arrow.Binary(), true), new arrow.Field('path', new arrow.Utf8(), true)]);
const images = arrow.vectorFromArray([...Array(T).keys()].map(t => ({ bytes: new Uint8Array(fs.readFileSync(new URL(`./png/${t}.png`, import.meta.url))), path: null })), img);
const state = arrow.vectorFromArray([...Array(T).keys()].map(t => [t, 0.5 * t]), new arrow.List(new arrow.Field('item', new arrow.Float32(), true)));
const action = arrow.vectorFromArray([...Array(T).keys()].map(t => [0.1 * t, 0, 0, 0, 0, 0.2, t % 2]), new arrow.FixedSizeList(7, new arrow.Field('item', new arrow.Float32(), true)));
const i64 = vals => arrow.vectorFromArray(vals.map(BigInt), new arrow.Int64());
const table = new arrow.Table({
  'observation.images.image': images,
  'observation.state': state,
  'action': action,
  'timestamp': arrow.vectorFromArray([...Array(T).keys()].map(t => t / 10), new arrow.Float32()),
  'frame_index': i64([...Array(T).keys()]),
  'episode_index': i64(Array(T).fill(0)),
  'index': i64([...Array(T).keys()]),
  'task_index': i64(Array(T).fill(0)),
});
console.log(table.schema.toString());
const wasmTable = pq.Table.fromIPCStream(arrow.tableToIPC(table, 'stream'));
const props = new pq.WriterPropertiesBuilder().setCompression(pq.Compression.SNAPPY).setMaxRowGroupSize(3).build();
fs.writeFileSync(root + '/data/chunk-000/episode_000000.parquet', pq.writeParquet(wasmTable, props));
fs.writeFileSync(root + '/meta/info.json', JSON.stringify({ codebase_version: 'v2.1', fps: 10, chunks_size: 1000,
  data_path: 'data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet', video_path: null,
  features: { 'observation.images.image': { dtype: 'image', shape: [4, 6, 3] }, 'observation.state': { dtype: 'float32', shape: [2] },
    action: { dtype: 'float32', shape: [7] }, timestamp: { dtype: 'float32', shape: [1] }, frame_index: { dtype: 'int64', shape: [1] },
    episode_index: { dtype: 'int64', shape: [1] }, index: { dtype: 'int64', shape: [1] }, task_index: { dtype: 'int64', shape: [1] } } }));
fs.writeFileSync(root + '/meta/episodes.jsonl', JSON.stringify({ episode_index: 0, tasks: ['Pick the cube'], length: T }) + '\n');
fs.writeFileSync(root + '/meta/tasks.jsonl', JSON.stringify({ task_index: 0, task: 'Pick the cube' }) + '\n');
