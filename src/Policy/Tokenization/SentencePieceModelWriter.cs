using System.Text;
using Google.Protobuf;

namespace OpenVLA.Policy.Tokenization;

/// <summary>
/// Writes a SentencePiece BPE `tokenizer.model` (a serialized sentencepiece ModelProto) of our own vocabulary, shaped like
/// Llama-2's: &lt;unk&gt;=0, &lt;s&gt;=1, &lt;/s&gt;=2, the 256 byte-fallback pieces &lt;0x00&gt;..&lt;0xFF&gt; at 3..258, the lone "▁",
/// whole-word pieces for the prompt and robot-instruction words (each reachable by BPE merges through its prefixes), and
/// — as in Llama-2, whose last 256 ids OpenVLA reuses as action bins — 256 pieces at the end that ordinary text never produces.
/// </summary>
public static class SentencePieceModelWriter
{
    /// <summary>Words that get their own pieces: the prompt template and the instructions of our simulated tasks.</summary>
    public static readonly string[] DefaultWords =
    [
        "In", "in", "what", "What", "action", "should", "the", "robot", "take", "to", "Out",
        "pick", "up", "put", "place", "push", "stack", "move", "lift", "grasp", "grab", "slide", "set",
        "cube", "block", "box", "plate", "target", "goal", "marker", "square", "pad", "onto", "on", "top", "of", "into", "it",
        "left", "right", "front", "back", "side", "table", "and", "a", "an", "at", "from", "toward", "towards",
        "red", "green", "blue", "yellow", "purple", "orange", "cyan", "white", "black",
    ];

    enum PieceType { Normal = 1, Unknown = 2, Control = 3, Byte = 6 }

    /// <summary>Builds the piece list: (piece, score, type) in id order.</summary>
    public static List<(string Piece, float Score, int Type)> BuildVocabulary(int vocabSize, IEnumerable<string>? words = null)
    {
        var pieces = new List<(string, float, int)>
        {
            ("<unk>", 0, (int)PieceType.Unknown), ("<s>", 0, (int)PieceType.Control), ("</s>", 0, (int)PieceType.Control),
        };
        for (int b = 0; b < 256; b++) pieces.Add(($"<0x{b:X2}>", 0, (int)PieceType.Byte));
        pieces.Add(("▁", -1, (int)PieceType.Normal));
        var seen = new HashSet<string> { "▁" };
        // Each word's prefixes "▁w", "▁wo", ... are pieces so BPE can merge up to the whole word; shorter prefixes score
        // higher, so merges proceed left to right through the word.
        float score = -2;
        foreach (var word in words ?? DefaultWords)
        {
            string full = "▁" + word;
            for (int len = 2; len <= full.Length; len++)
            {
                string prefix = full[..len];
                if (seen.Add(prefix)) pieces.Add((prefix, score - len, (int)PieceType.Normal));
            }
        }
        int actionStart = vocabSize - 256;
        if (pieces.Count > actionStart)
            throw new ArgumentException($"vocabulary of {vocabSize} is too small for {pieces.Count} base pieces and 256 action pieces");
        // Fillers and action pieces: single CJK ideographs (U+4E00 onwards), which robot instructions do not contain.
        int cp = 0x4E00;
        float fillerScore = -10000;
        while (pieces.Count < vocabSize) pieces.Add((char.ConvertFromUtf32(cp++), fillerScore--, (int)PieceType.Normal));
        return pieces;
    }

    public static void Write(string path, int vocabSize, IEnumerable<string>? words = null)
    {
        var pieces = BuildVocabulary(vocabSize, words);
        using var ms = new MemoryStream();
        var o = new CodedOutputStream(ms);
        foreach (var (piece, score, type) in pieces)
        {
            var m = new MemoryStream();
            var po = new CodedOutputStream(m);
            po.WriteTag(1, WireFormat.WireType.LengthDelimited); po.WriteBytes(ByteString.CopyFrom(Encoding.UTF8.GetBytes(piece)));
            po.WriteTag(2, WireFormat.WireType.Fixed32); po.WriteFloat(score);
            po.WriteTag(3, WireFormat.WireType.Varint); po.WriteEnum(type);
            po.Flush();
            o.WriteTag(1, WireFormat.WireType.LengthDelimited); o.WriteBytes(ByteString.CopyFrom(m.ToArray()));
        }
        // trainer_spec: model_type BPE, vocab_size, byte_fallback, unk/bos/eos/pad ids.
        var t = new MemoryStream();
        var to = new CodedOutputStream(t);
        to.WriteTag(3, WireFormat.WireType.Varint); to.WriteEnum(2);
        to.WriteTag(4, WireFormat.WireType.Varint); to.WriteInt32(pieces.Count);
        to.WriteTag(35, WireFormat.WireType.Varint); to.WriteBool(true);
        to.WriteTag(40, WireFormat.WireType.Varint); to.WriteInt32(0);
        to.WriteTag(41, WireFormat.WireType.Varint); to.WriteInt32(1);
        to.WriteTag(42, WireFormat.WireType.Varint); to.WriteInt32(2);
        to.WriteTag(43, WireFormat.WireType.Varint); to.WriteInt32(-1);
        to.Flush();
        o.WriteTag(2, WireFormat.WireType.LengthDelimited); o.WriteBytes(ByteString.CopyFrom(t.ToArray()));
        // normalizer_spec: identity, add_dummy_prefix, keep whitespace as is (proto2 default of remove_extra_whitespaces
        // is true, so it must be written), escape whitespace as "▁".
        var n = new MemoryStream();
        var no = new CodedOutputStream(n);
        no.WriteTag(1, WireFormat.WireType.LengthDelimited); no.WriteString("identity");
        no.WriteTag(3, WireFormat.WireType.Varint); no.WriteBool(true);
        no.WriteTag(4, WireFormat.WireType.Varint); no.WriteBool(false);
        no.WriteTag(5, WireFormat.WireType.Varint); no.WriteBool(true);
        no.Flush();
        o.WriteTag(3, WireFormat.WireType.LengthDelimited); o.WriteBytes(ByteString.CopyFrom(n.ToArray()));
        o.Flush();
        File.WriteAllBytes(path, ms.ToArray());
    }
}
