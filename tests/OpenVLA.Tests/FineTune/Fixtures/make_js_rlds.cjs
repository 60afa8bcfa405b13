// Writes Fixtures/js_rlds: one TFRecord shard holding the same RLDS episode twice, framed and encoded by an independent
// implementation (@roboflow/tfrecords: its own CRC32C and masking, google-protobuf's tf.train.Example), not by our writer.
// The test RldsReaderTests.Reads_a_shard_written_by_another_tfrecord_implementation checks our reader against it.
//
// Regenerate: npm install @roboflow/tfrecords@1.0.4; put png/0.png..png/3.png beside this script (6x4 RGB, byte i of
// frame t = (50·t + i) mod 256); node make_js_rlds.cjs
const { TFRecordsBuilder, FeatureType } = require('@roboflow/tfrecords');
const fs = require('fs');
const path = require('path');
const T = 4;
const b = new TFRecordsBuilder();
b.addArrayFeature('steps/observation/image', FeatureType.Binary, [...Array(T).keys()].map(t => new Uint8Array(fs.readFileSync(path.join(__dirname, 'png', `${t}.png`)))));
b.addArrayFeature('steps/action', FeatureType.Float, [...Array(T).keys()].flatMap(t => [0.5 * t, 0, 0, 0, 0, 0.25, -1 + 2 * (t % 2)]));
b.addArrayFeature('steps/language_instruction', FeatureType.String, Array(T).fill('open the top drawer'));
b.addArrayFeature('steps/is_first', FeatureType.Int64, [...Array(T).keys()].map(t => t === 0 ? 1 : 0));
b.addArrayFeature('steps/is_last', FeatureType.Int64, [...Array(T).keys()].map(t => t === T - 1 ? 1 : 0));
const rec = b.build();
fs.mkdirSync(path.join(__dirname, 'js_rlds'), { recursive: true });
fs.writeFileSync(path.join(__dirname, 'js_rlds', 'libero_like-train.tfrecord-00000-of-00001'), TFRecordsBuilder.buildTFRecords([rec, rec]));
