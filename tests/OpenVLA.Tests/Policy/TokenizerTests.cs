using OpenVLA.Policy;
using OpenVLA.Policy.Tokenization;

namespace OpenVLA.Tests.Policy;

public class TokenizerTests
{
    [Fact]
    public void PromptIdsOfAKnownInstructionOnTheGeneratedTokenizer()
    {
        using var tmp = new TestPaths.TempDir();
        SentencePieceModelWriter.Write(tmp["tokenizer.model"], 1024);
        var tok = VlaTokenizer.Load(tmp["tokenizer.model"]);
        var vocab = SentencePieceModelWriter.BuildVocabulary(1024).Select((p, i) => (p.Piece, i)).ToDictionary(x => x.Piece, x => x.i);
        int Id(string piece) => vocab[piece];
        int Byte(char c) => 3 + c; // <0x00> is id 3

        // "In: What action should the robot take to pick up the red cube?\nOut:" then the lone "▁" appended:
        // words are whole pieces (with the "▁" space marker), punctuation and "Out" fall back to byte pieces.
        int[] expected =
        [
            1, Id("▁In"), Byte(':'), Id("▁What"), Id("▁action"), Id("▁should"), Id("▁the"), Id("▁robot"), Id("▁take"), Id("▁to"),
            Id("▁pick"), Id("▁up"), Id("▁the"), Id("▁red"), Id("▁cube"), Byte('?'), Byte('\n'), Byte('O'), Byte('u'), Byte('t'),
            Byte(':'), Id("▁"),
        ];
        Assert.Equal(expected, tok.PromptIds("Pick up the RED cube"));   // the instruction is lower-cased
        Assert.Equal(259, tok.SpaceId);
        Assert.Equal(1024, tok.VocabSize);
        Assert.Equal(1, tok.BosId);
        Assert.Equal(2, tok.EosId);
    }

    [Fact]
    public void UnknownWordsFallBackToBytesAndDecodeBack()
    {
        using var tmp = new TestPaths.TempDir();
        SentencePieceModelWriter.Write(tmp["tokenizer.model"], 1024);
        var tok = VlaTokenizer.Load(tmp["tokenizer.model"]);
        var ids = tok.Encode("wipe the café");
        Assert.Equal(1, ids[0]);
        Assert.Contains(3 + 0xC3, ids); // 'é' = C3 A9 in UTF-8, as byte pieces
        Assert.Contains(3 + 0xA9, ids);
        Assert.Equal("wipe the café", tok.Decode(ids.Skip(1)));
    }

    [Fact]
    public void GoldenTokenizerGivesTheReferencePromptIds()
    {
        var tok = VlaTokenizer.Load(TestPaths.Fixture("openvla-golden", "checkpoint", "tokenizer.model"));
        foreach (var c in GoldenModelTests.Cases()) Assert.Equal(c.PromptTokenIds, tok.PromptIds(c.Instruction));
    }

    [Fact]
    public void EmptyInstructionIsAnInputError() =>
        Assert.Throws<PolicyInputException>(() => VlaTokenizer.Load(TestPaths.Fixture("openvla-golden", "checkpoint", "tokenizer.model")).PromptIds("  "));

    [Fact]
    public void ActionPiecesAreTheLast256IdsAndNeverComeFromText()
    {
        var vocab = SentencePieceModelWriter.BuildVocabulary(1024);
        Assert.Equal(1024, vocab.Count);
        Assert.All(vocab.Skip(1024 - 256), p => Assert.True(p.Piece.Length == 1 && p.Piece[0] >= 0x4E00, p.Piece));
    }
}
