import CoreML
import ImageIO
import UIKit
import Vision

/// One label predicted by the model and its confidence, from 0 to 1.
struct Prediction: Identifiable, Sendable {
    let label: String
    let confidence: Float
    var id: String { label }
}

enum ClassifierError: LocalizedError {
    case modelMissing
    case unreadableImage

    var errorDescription: String? {
        switch self {
        case .modelMissing:
            return "No model installed. Run: toolchain install --app ios --from <build output folder>"
        case .unreadableImage:
            return "This photo could not be read."
        }
    }
}

/// Runs the Core ML classifier installed at Model/ImageClassifier.mlmodel or .mlpackage.
///
/// Xcode compiles either one into ImageClassifier.mlmodelc in the app bundle. The model is
/// loaded by name rather than through an Xcode-generated class, so the app builds without a
/// model and any Core ML image classifier can be swapped in. The labels come from the model.
///
/// `@unchecked Sendable`: the Vision model is never mutated after loading, and each call
/// creates its own request.
final class Classifier: @unchecked Sendable {
    private let model: VNCoreMLModel

    /// Loads the model; slow the first time, so call it off the main thread.
    init() throws {
        guard let url = Bundle.main.url(forResource: "ImageClassifier", withExtension: "mlmodelc") else {
            throw ClassifierError.modelMissing
        }
        let configuration = MLModelConfiguration()
        // Core ML may run the model on the CPU (float32) or on the GPU or Neural Engine
        // (float16). The toolchain's verifier checked both: a row as the CPU computes it and
        // a row with every value rounded to float16 (coreml-numpy-float16), each against the
        // original on held-out photos. Choose .cpuOnly to ship float32 arithmetic only,
        // slower and costlier in battery.
        configuration.computeUnits = .all
        let mlModel = try MLModel(contentsOf: url, configuration: configuration)
        model = try VNCoreMLModel(for: mlModel)
    }

    /// The `count` most likely labels for `image`. Blocks while the model runs.
    func classify(_ image: UIImage, count: Int = 3) throws -> [Prediction] {
        guard let cgImage = image.cgImage else { throw ClassifierError.unreadableImage }

        let request = VNCoreMLRequest(model: model)
        // The toolchain trains on the whole photo resized to a square, without cropping.
        request.imageCropAndScaleOption = .scaleFill

        // cgImage holds the pixels as stored; the orientation tells Vision which way is up.
        let orientation = CGImagePropertyOrientation(image.imageOrientation)
        let handler = VNImageRequestHandler(cgImage: cgImage, orientation: orientation)
        try handler.perform([request])

        let observations = request.results as? [VNClassificationObservation] ?? []
        return observations
            .sorted { $0.confidence > $1.confidence }
            .prefix(count)
            .map { Prediction(label: $0.identifier, confidence: $0.confidence) }
    }
}

extension CGImagePropertyOrientation {
    /// The EXIF orientation matching a UIImage orientation.
    init(_ orientation: UIImage.Orientation) {
        switch orientation {
        case .up: self = .up
        case .upMirrored: self = .upMirrored
        case .down: self = .down
        case .downMirrored: self = .downMirrored
        case .left: self = .left
        case .leftMirrored: self = .leftMirrored
        case .right: self = .right
        case .rightMirrored: self = .rightMirrored
        @unknown default: self = .up
        }
    }
}
